"""Budget-aware defaults (`moco.defaults`): the preset's values fitted to the planned length of
the run, the short-run recipe, and what the user set or `--paper-defaults` asks for kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moco.config import build_config, resolve_stem
from moco.defaults import SHORT_RUN_BASE_LR, fit_recipe, fit_stem_to_precision, fit_to_plan
from moco.model import MoCo


# -- fitted to the plan ---------------------------------------------------------------------------
def test_defaults_fit_momentum_queue_and_warmup_to_a_short_plan():
    config = build_config({})
    notes = fit_to_plan(config, set(), num_images=100_000, planned_steps=511, steps_per_epoch=390)
    assert config.moco_m == pytest.approx(0.9022)
    assert notes[0] == ("moco_m 0.999 -> 0.9022: an averaging horizon of 1000 steps would exceed 2% of the "
                        "511 planned steps")
    assert config.queue_size == 10 * 256 and notes[1].startswith("queue_size 65536 -> 2560: ")
    assert round(config.warmup_epochs * 390) == 26 and notes[2].startswith("warmup_epochs 0 -> ")
    assert len(notes) == 3

    tiny = build_config({"moco_m_cos": True})
    fit_to_plan(tiny, set(), num_images=1000, planned_steps=30, steps_per_epoch=3)
    assert tiny.moco_m == 0.9  # the floor


def test_a_plan_too_short_to_learn_is_said_so_and_keeps_its_recipe():
    config = build_config({})
    notes = fit_to_plan(config, set(), num_images=1797, planned_steps=10, steps_per_epoch=14)
    assert notes[-1].startswith("10 planned steps: runs this short were measured to end below the random")
    assert config.base_lr == build_config({}).base_lr  # the measured rates only lost less: left alone
    assert not any("runs this short" in n for n in fit_to_plan(build_config({}), set(), num_images=1797,
                                                                planned_steps=20, steps_per_epoch=14))


def test_defaults_keep_what_the_user_set_and_what_a_long_run_needs():
    config = build_config({"moco_m": 0.999, "queue_size": 65536})
    notes = fit_to_plan(config, {"moco_m", "queue_size"}, num_images=100_000, planned_steps=511, steps_per_epoch=390)
    assert (config.moco_m, config.queue_size) == (0.999, 65536) and all("warmup" in n for n in notes)

    long = build_config({})
    fit_to_plan(long, set(), num_images=1_000_000, planned_steps=100_000, steps_per_epoch=3900)
    assert (long.moco_m, long.queue_size) == (0.999, 65536)

    v3 = build_config({"preset": "v3"})  # 10 warm-up epochs: most of a 20-epoch run
    notes = fit_to_plan(v3, set(), num_images=100_000, planned_steps=2000, steps_per_epoch=100)
    assert round(v3.warmup_epochs * 100) == 400 and "the preset's 10 epochs" in notes[-1]


def test_paper_defaults_keep_the_published_values():
    config = build_config({"paper_defaults": True, "batch_size": 128})
    assert fit_to_plan(config, set(), num_images=100_000, planned_steps=300, steps_per_epoch=781) == []
    assert (config.moco_m, config.queue_size, config.temperature, config.lr_schedule) == (0.999, 65536, 0.2, "cosine")
    assert config.effective_lr == pytest.approx(0.03 * 128 / 256) and config.warmup_epochs == 0


def test_the_short_run_recipe_changes_v2_and_says_why():
    config = build_config({"image_size": 32})
    notes = fit_recipe(config, set())
    assert (config.head, config.batch_negatives, config.queue_start, config.blur_relative) == \
        ("mlp_bn", True, "empty", True)
    assert config.base_lr == SHORT_RUN_BASE_LR and len(notes) == 5
    assert any("0.03 -> 0.6" in note for note in notes)


def test_the_short_run_recipe_keeps_what_the_user_set():
    config = build_config({"image_size": 32, "head": "mlp", "lr": 0.1, "queue_start": "random"})
    fit_recipe(config, {"head", "lr", "queue_start"})
    assert (config.head, config.queue_start, config.base_lr, config.effective_lr) == ("mlp", "random", 0.03, 0.1)
    assert config.batch_negatives and config.blur_relative


def test_paper_defaults_and_other_presets_keep_their_recipe():
    paper = build_config({"paper_defaults": True, "image_size": 32})
    v3 = build_config({"preset": "v3", "image_size": 32})
    assert fit_recipe(paper, set()) == [] and fit_recipe(v3, set()) == []
    assert (paper.head, paper.batch_negatives, paper.queue_start, paper.blur_relative) == \
        ("mlp", False, "random", False)


# -- the stem follows the precision in a CPU time budget at 32 px ---------------------------------
def test_an_fp32_cpu_budget_at_32_px_takes_the_imagenet_stem_and_says_why():
    config = build_config({"image_size": 32, "time_budget": 1800.0, "precision": "fp32"})
    notes = fit_stem_to_precision(config, "cpu")
    assert config.stem == "imagenet" and resolve_stem(config) == "imagenet"
    assert len(notes) == 1 and notes[0].startswith("stem auto -> imagenet: this run is fp32 on a CPU")


@pytest.mark.parametrize("given, device", [
    ({"precision": "bf16"}, "cpu"),                           # bf16 pays for the small stem
    ({"precision": "fp32", "time_budget": None}, "cpu"),       # epochs: the length is fixed, not the minutes
    ({"precision": "fp32"}, "cuda"),
    ({"precision": "fp32", "image_size": 16}, "cpu"),          # the ImageNet stem would leave < 1 px
    ({"precision": "fp32", "stem": "small"}, "cpu"),           # as given
    ({"precision": "fp32", "paper_defaults": True}, "cpu"),
])
def test_the_small_stem_stays_everywhere_else(given, device):
    config = build_config({"image_size": 32, "time_budget": 1800.0, **given})
    assert fit_stem_to_precision(config, device) == []
    assert resolve_stem(config) == "small"


def test_a_shrunk_queue_keeps_the_newest_keys():
    fake = SimpleNamespace(queue=torch.arange(10.0).repeat(2, 1), queue_ptr=torch.tensor(3),
                           queue_filled=torch.tensor(10))
    MoCo.shrink_queue(fake, 4)  # slots 3.. are oldest; newest are 9, 0, 1, 2 in order of arrival
    assert fake.queue[0].tolist() == [9.0, 0.0, 1.0, 2.0] and int(fake.queue_ptr) == 0
    assert int(fake.queue_filled) == 4
