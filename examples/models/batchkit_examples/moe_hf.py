"""A Hugging Face MoE causal language model built from its config (random weights: nothing is
downloaded) on the byte-level two-domain text of :mod:`batchkit_examples.moe_lm`, for
``examples/moe_hf.yaml``.

The model sits in ``self.model``, so its module names as the plugins see them start with
``model.`` (``model.model.layers.0.mlp.gate``). Its config keeps ``output_router_logits`` off: the
``moe_lbl`` plugin reads the routers itself, and the model's own load-balancing loss would count the
LBL twice (the plugin refuses that configuration). Needs ``transformers`` (imported here only).
"""

from __future__ import annotations

from typing import Optional

import torch

from batchkit_examples.moe_lm import ByteLanguageModel


class HFMoELanguageModel(ByteLanguageModel):
    """``AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))`` trained on byte
    windows: the loss is the model's own next-byte cross-entropy (nats per byte).

    :param model_type: a transformers model type with an MoE, e.g. ``mixtral``, ``qwen2_moe``,
        ``qwen3_moe``, ``olmoe``, ``deepseek_v3``.
    :param config: the config's fields (``vocab_size`` must be 256 for bytes).
    """

    def __init__(self, model_type: str = "mixtral", config: Optional[dict] = None, lr: float = 3e-3,
                 weight_decay: float = 0.1, warmup_steps: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoConfig
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(config or {})))

    def lm_loss(self, window: torch.Tensor) -> torch.Tensor:
        # labels = inputs: the model shifts them, predicting byte t + 1 from bytes 0..t
        return self.model(input_ids=window, labels=window).loss

