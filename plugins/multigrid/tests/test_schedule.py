"""The multigrid schedule: SlowFast's Kinetics 8x8 test vector, hand-computed cases in our units,
the short cycle per iteration, and the errors for bad options."""

from __future__ import annotations

import math

import pytest

from batchkit_multigrid import GridShape
from batchkit_multigrid import MultigridSchedule
from batchkit_multigrid import short_cycle_batches


def slowfast_8x8(**kw) -> MultigridSchedule:
    """configs/Kinetics/SLOWFAST_8x8_R50_stepwise_multigrid.yaml: T0 = 32, S0 = 224,
    SOLVER.STEPS [0, 94, 154, 196], MAX_EPOCH 239, GAMMA 0.1, both cycles, BATCH_SIZE 64."""
    return MultigridSchedule((32, 224, 224), 239, [94, 154, 196], base_batch_size=64, **kw)


# ------------------------------------------------------------------ SlowFast's test vector


def test_slowfast_8x8_steps_lrs_and_max_epoch():
    s = slowfast_8x8()
    assert s.lr_steps == [0, 73, 110, 142, 158, 205, 228, 248, 259, 291, 308, 322, 329, 343]
    assert s.lr_factors == pytest.approx([8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01, 0.01, 0.001])
    assert s.max_epochs == 358
    assert s.iteration_saving == pytest.approx(5.75)  # 196 / (196 * 4 / 23)


def test_slowfast_8x8_stage_shapes_and_ends():
    s = slowfast_8x8()
    # [B factor, T, S] per stage, as SlowFast prints its schedule (issue #231).
    cycle = [[8, 8, 158], [4, 16, 158], [2, 16, 224], [1, 32, 224]]
    expected_ends = [73, 110, 142, 158, 205, 228, 248, 259, 291, 308, 322, 329, 358]
    got = [[st.shape.batch_factor, st.shape.size[0], st.shape.size[1]] for st in s.stages]
    assert got == cycle * 3 + [[1, 32, 224]]
    assert all(st.shape.size[1] == st.shape.size[2] for st in s.stages)
    assert [st.end_epoch for st in s.stages] == expected_ends
    assert [st.start_epoch for st in s.stages] == [0] + expected_ends[:-1]
    assert [st.lr_stage for st in s.stages] == [0] * 4 + [1] * 4 + [2] * 4 + [3]
    assert [st.fine_tune for st in s.stages] == [False] * 12 + [True]


def test_slowfast_8x8_mean_batch_factors():
    s = slowfast_8x8()
    means = [s._mean_batch_factor(k) for k in range(4)]
    assert means == pytest.approx([32 / 3, 16 / 3, 14 / 3, 7 / 3])  # 10.67, 5.33, 4.67, 2.33


def test_slowfast_8x8_short_cycle_per_iteration():
    """ShortCycleBatchSampler: batch sizes B·round((S / (σ·S0))²), crops round(σ·S0) = 112, 158."""
    s = slowfast_8x8()
    expected = {
        0: [(128 * 8, (8, 112, 112)), (64 * 8, (8, 158, 158)), (64 * 8, (8, 158, 158))],  # the 2x,1x,1x of #429
        73: [(64 * 8, (16, 112, 112)), (64 * 4, (16, 158, 158)), (64 * 4, (16, 158, 158))],
        110: [(64 * 8, (16, 112, 112)), (64 * 4, (16, 158, 158)), (64 * 2, (16, 224, 224))],
        142: [(64 * 4, (32, 112, 112)), (64 * 2, (32, 158, 158)), (64, (32, 224, 224))],
        329: [(64 * 4, (32, 112, 112)), (64 * 2, (32, 158, 158)), (64, (32, 224, 224))],  # fine-tune keeps the short cycle
    }
    for epoch, cycle in expected.items():
        for iteration in range(7):
            b, size, position = s.batch_shape(epoch, iteration)
            assert position == iteration % 3
            assert (b, size) == cycle[iteration % 3], (epoch, iteration)


def test_slowfast_lr_lookup_and_scale():
    s = slowfast_8x8()
    assert s.lr_factor(0) == 8 and s.lr_factor(72.9) == 8 and s.lr_factor(73) == 4
    assert s.lr_factor(158) == pytest.approx(0.8)
    assert s.lr_factor(342.5) == pytest.approx(0.01) and s.lr_factor(343) == pytest.approx(0.001)
    assert s.lr_factor(400) == pytest.approx(0.001)
    # The multigrid part alone: β_k of the long-cycle shape, never the short cycle.
    assert [s.lr_scale(e) for e in (0, 73, 110, 142, 158, 329, 357)] == [8, 4, 2, 1, 8, 1, 1]


def test_slowfast_eval_epochs():
    """misc.is_eval_epoch with EVAL_FREQ 3: period (len // 3 + 1), counted back from each stage's end."""
    s = slowfast_8x8()
    # stage [0, 73): period 73 // 3 + 1 = 25 -> epochs 72, 47, 22
    assert [e for e in range(73) if s.is_eval_epoch(e)] == [22, 47, 72]
    # stage [329, 358) (the fine-tune): period 29 // 3 + 1 = 10 -> 357, 347, 337
    assert [e for e in range(329, 358) if s.is_eval_epoch(e)] == [337, 347, 357]


def test_short_cycle_only_and_long_cycle_only():
    """SlowFast's other two modes: short cycle alone scales STEPS and MAX_EPOCH by EPOCH_FACTOR."""
    short = slowfast_8x8(long_cycle=False)
    assert short.lr_steps == [0, 141, 231, 294] and short.max_epochs == 358
    assert short.lr_factors == pytest.approx([1, 0.1, 0.01, 0.001])
    assert short.batch_sizes(0) == [64 * 4, 64 * 2, 64] and short.lr_scale(100) == 1.0
    long_only = slowfast_8x8(short_cycle=False)
    assert long_only.batch_sizes(0) == [64 * 8]
    assert [s.shape.batch_factor for s in long_only.stages[:4]] == [8, 4, 2, 1]
    # without the short cycle every shape's mean batch factor is its own: 8, 4, 2, 1 (sum 15)
    assert long_only.iteration_saving == pytest.approx(196 / (196 * 4 / 15))
    assert long_only.stages[-1].fine_tune and long_only.stages[-1].shape == GridShape(1, (32, 224, 224))


# ------------------------------------------------------------------ our units, by hand


def test_hand_case_clip_16x64x64():
    """Base (16, 64, 64), b = 4, 10 baseline epochs, one milestone at 8 (one long cycle + fine-tune).

    Long cycle: (4, 45, 45) β = round(65536 / 8100) = 8; (8, 45, 45) β = 4; (8, 64, 64) β = 2; base β = 1.
    Mean factors as SlowFast: 32/3, 16/3, 14/3, 7/3 (sum 23); saving = 8 / (8·4/23) = 5.75;
    fine-tune 2 / 5.75 · 7/3 = 56/69 epochs; x = 15 / (8 + 56/69) = 1035/608;
    cumulative ends 6.316, 9.474, 12.237, 13.618, 15.0 -> 6, 9, 12, 14, 15.
    """
    s = MultigridSchedule((16, 64, 64), 10, [8], base_batch_size=4)
    assert [st.shape for st in s.stages] == [GridShape(8, (4, 45, 45)), GridShape(4, (8, 45, 45)),
                                             GridShape(2, (8, 64, 64)), GridShape(1, (16, 64, 64)),
                                             GridShape(1, (16, 64, 64))]
    assert [st.end_epoch for st in s.stages] == [6, 9, 12, 14, 15]
    assert s.max_epochs == 15
    assert s.lr_steps == [0, 6, 9, 12, 14, 14]  # the fine-tune's first half rounds to nothing
    assert s.lr_factors == pytest.approx([8, 4, 2, 1, 1, 0.1])
    # short cycles: round((45/32)^2) = 2, round((45/45.25)^2) = 1; round((64/32)^2) = 4, round((64/45.25)^2) = 2
    assert s.batch_sizes(0) == [64, 32, 32]
    assert s.batch_sizes(6) == [32, 16, 16]
    assert s.batch_sizes(9) == [32, 16, 8]
    assert s.batch_sizes(12) == [16, 8, 4] == s.batch_sizes(14) == s.batch_sizes(99)
    assert [s.batch_shape(0, i).size for i in range(4)] == [(4, 32, 32), (4, 45, 45), (4, 45, 45), (4, 32, 32)]
    assert [s.batch_shape(9, i).size for i in range(3)] == [(8, 32, 32), (8, 45, 45), (8, 64, 64)]


def test_hand_case_image_28x28():
    """Images (28, 28), b = 32, the image long cycle (1/√2, 1): 20x20 with β = round(784/400) = 2,
    then 28x28. Short cycle 14x14 and 20x20: at 20x20 round(400/196) = 2 and round(400/392) = 1
    (x β = 2), at 28x28 round(784/196) = 4 and round(784/392) = 2."""
    s = MultigridSchedule((28, 28), 10, [8], base_batch_size=32)
    assert s.long_cycle_shapes == [GridShape(2, (20, 20)), GridShape(1, (28, 28))]
    assert s.batch_sizes(0) == [128, 64, 64]
    assert [s.batch_shape(0, i).size for i in range(3)] == [(14, 14), (20, 20), (20, 20)]
    assert s.batch_sizes(s.max_epochs - 1) == [128, 64, 32]
    # nominal mean factors: (784/196, 784/392, 784/400) -> (4, 2, 2) and (4, 2, 1): 8/3 and 7/3
    assert s._mean_batch_factor(0) == pytest.approx(8 / 3) and s._mean_batch_factor(1) == pytest.approx(7 / 3)
    # two shapes with equal iterations: epochs split 8:7 in the one LR stage before the fine-tune
    first, second = s.stages[0], s.stages[1]
    assert (first.end_epoch - first.start_epoch) >= (second.end_epoch - second.start_epoch)


def test_batches_in_epoch_is_the_exact_count():
    s = MultigridSchedule((16, 64, 64), 10, [8], base_batch_size=4)
    sizes = s.batch_sizes(0)  # [64, 32, 32]
    for n in (0, 31, 64, 100, 127, 128, 1000, 1001, 4000):
        for drop_last in (True, False):
            batches = list(short_cycle_batches(list(range(n)), sizes, drop_last))
            assert s.batches_in_epoch(0, n, drop_last) == len(batches), (n, drop_last)
    # 1000 = 7 cycles of 128 (21 batches) + 64 + 32 + 8 left over
    assert s.batches_in_epoch(0, 1000) == 23 and s.batches_in_epoch(0, 1000, drop_last=False) == 24


def test_short_cycle_batches_order_and_positions():
    batches = list(short_cycle_batches(list(range(20)), [4, 2, 1]))
    assert [b for b, _ in batches] == [[0, 1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12], [13], [14, 15, 16, 17], [18, 19]]
    assert [p for _, p in batches] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [len(b) for b, _ in short_cycle_batches(list(range(20)), [4, 2, 1], drop_last=False)][-1] == 2
    assert len(list(short_cycle_batches(list(range(19)), [4, 2, 1]))) == 7  # the 1-of-2 leftover is dropped


def test_epoch_factor_scales_the_total():
    for factor in (1.0, 1.5, 2.0):
        s = slowfast_8x8(epoch_factor=factor)
        assert abs(s.max_epochs - 239 * factor) <= 0.5


def test_stages_cover_the_run_without_gaps():
    for base, milestones, epochs in [((32, 224, 224), [94, 154, 196], 239), ((16, 64, 64), [6, 8], 10),
                                     ((8, 32, 32), [3], 4), ((28, 28), [12], 15)]:
        s = MultigridSchedule(base, epochs, milestones)
        assert s.stages[0].start_epoch == 0 and s.stages[-1].end_epoch == s.max_epochs
        assert all(a.end_epoch == b.start_epoch for a, b in zip(s.stages, s.stages[1:]))
        assert all(s.stage_at(e).start_epoch <= e < s.stage_at(e).end_epoch for e in range(s.max_epochs))
        # constant work per iteration, up to rounding: b·β·V ≈ V0 on every long-cycle shape
        v0 = math.prod(base)
        for shape in s.long_cycle_shapes:
            assert 0.7 < shape.batch_factor * math.prod(shape.size) / v0 < 1.3


# ------------------------------------------------------------------ bad options


@pytest.mark.parametrize(
    "kwargs, words",
    [
        # a shape factor that does not divide the input
        (dict(base_size=(10, 64, 64)), ["long_cycle_factors[0]", "does not divide", "T = 10", "1/2, 1/5"]),
        (dict(base_size=(16, 64, 64), long_cycle_factors=[(1 / 3, 1), (1, 1)]), ["long_cycle_factors[0]", "does not divide"]),
        # a batch factor that gives a batch of 0
        (dict(base_size=(28, 28), long_cycle_factors=[(1, 1.5), (1, 1)]), ["long_cycle_factors[0]", "batch factor", "is 0", "<= 1"]),
        (dict(base_size=(64, 64), long_cycle_factors=[(1, 0.5), (1, 1)]), ["short_cycle_factors[1]", "is 0", "no larger"]),
        # images have no T
        (dict(base_size=(28, 28), long_cycle_factors=[(0.5, 1), (1, 1)]), ["long_cycle_factors[0]", "images", "temporal factor 1"]),
        (dict(base_size=(16, 64, 64), long_cycle_factors=[(0.5, 0.5)]), ["must end with [1, 1]"]),
        (dict(base_size=(16, 64, 64), lr_milestones=[]), ["lr_milestones is empty", "lr_milestones=[8]"]),
        (dict(base_size=(16, 64, 64), lr_milestones=[4, 3]), ["lr_milestones must increase"]),
        (dict(base_size=(16, 64, 64), lr_milestones=[10]), ["lr_milestones must increase"]),
        (dict(base_size=(16, 64)), []),
        (dict(base_size=(64,)), ["base_size must be (T, H, W)"]),
        (dict(base_size=(16, 64, 64), base_batch_size=0), ["base_batch_size must be an integer >= 1"]),
        (dict(base_size=(16, 64, 64), long_cycle=False, short_cycle=False), ["both off"]),
        (dict(base_size=(16, 64, 64), short_cycle_factors=[0.5, -1]), ["short_cycle_factors[1]"]),
        (dict(base_size=(16, 64, 64), long_cycle_factors=[(1, 0.001), (1, 1)]), ["long_cycle_factors[0]", "no pixel"]),
    ],
)
def test_bad_options_name_the_option_and_the_fix(kwargs, words):
    args = dict(max_epochs=10, lr_milestones=[8])
    args.update(kwargs)
    if not words:  # a valid image size: no error
        MultigridSchedule(args.pop("base_size"), **args)
        return
    with pytest.raises(ValueError) as info:
        MultigridSchedule(args.pop("base_size"), **args)
    message = str(info.value)
    assert message.startswith("multigrid: ")
    for word in words:
        assert word in message, message


def test_negative_epoch_is_refused():
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        slowfast_8x8().batch_shape(-1, 0)


def test_module_lr_milestones_give_slowfasts_lr_with_the_batch_factor():
    """The module's own step schedule decays by γ at module_lr_milestones, multigrid multiplies by
    β_k: their product is SlowFast's LR at every epoch. For the 8x8 vector: the starts of LR stages 1
    and 2 (158, 259) and the middle of the fine-tune (343)."""
    s = slowfast_8x8()
    assert s.module_lr_milestones == [158, 259, 343]
    cases = [s, MultigridSchedule((16, 64, 64), 10, [7, 9]), MultigridSchedule((16, 64, 64), 10, [8]),
             slowfast_8x8(long_cycle=False), slowfast_8x8(short_cycle=False), MultigridSchedule((28, 28), 15, [12])]
    for schedule in cases:
        milestones = schedule.module_lr_milestones
        for epoch in range(schedule.max_epochs + 2):
            decays = sum(m <= epoch for m in milestones)
            assert schedule.gamma**decays * schedule.lr_scale(epoch) == pytest.approx(schedule.lr_factor(epoch), rel=1e-12)
    # our benchmark's baseline (10 epochs, decays at 7 and 9): LR stage 1 begins at 11, the fine-tune's
    # middle rounds onto its start (14), so the fine-tune runs at γ² throughout
    assert MultigridSchedule((16, 64, 64), 10, [7, 9]).module_lr_milestones == [11, 14]
    assert slowfast_8x8(long_cycle=False).module_lr_milestones == [141, 231, 294]
