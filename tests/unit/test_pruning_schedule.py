import pytest
import torch

from ps_worker.pruning import PruningConfig, magnitude_mask, magnitude_threshold


def test_schedule_follows_the_cubic_formula_on_pruning_steps_only() -> None:
    config = PruningConfig(final_sparsity=0.9, initial_sparsity=0.1, begin_step=100, end_step=200, frequency=25)
    for step in range(0, 300):
        sparsity = config.sparsity_at(step)
        if step in (100, 125, 150, 175, 200):
            expected = 0.9 + (0.1 - 0.9) * (1 - (step - 100) / 100) ** 3
            assert sparsity == pytest.approx(expected, abs=1e-12)
        else:
            assert sparsity is None
    assert config.sparsity_at(100) == pytest.approx(0.1) and config.sparsity_at(200) == pytest.approx(0.9)


def test_end_step_is_a_pruning_step_even_off_the_frequency_grid() -> None:
    config = PruningConfig(final_sparsity=0.5, begin_step=0, end_step=7, frequency=3)
    assert [s for s in range(10) if config.sparsity_at(s) is not None] == [0, 3, 6, 7]
    assert config.sparsity_at(7) == pytest.approx(0.5)


def test_biases_norms_and_vectors_are_not_prunable_by_default() -> None:
    config = PruningConfig(final_sparsity=0.5, begin_step=0, end_step=1)
    assert config.prunable("fc.weight", torch.zeros(32, 32))
    assert not config.prunable("fc.bias", torch.zeros(32, 32))
    assert not config.prunable("layer_norm.weight", torch.zeros(32, 32))
    assert not config.prunable("scale", torch.zeros(1024))
    assert not config.prunable("tiny.weight", torch.zeros(3, 3))


def test_threshold_prunes_the_requested_fraction() -> None:
    tensor = torch.randn(1000)
    mask = magnitude_mask(tensor, 0.8)
    assert int((~mask).sum()) == 800
    assert tensor[~mask].abs().max() < tensor[mask].abs().min()
    assert magnitude_threshold(tensor, 0.0) is None


def test_invalid_schedules_are_refused() -> None:
    with pytest.raises(ValueError):
        PruningConfig(final_sparsity=1.0, begin_step=0, end_step=1)
    with pytest.raises(ValueError):
        PruningConfig(final_sparsity=0.5, begin_step=5, end_step=1)
