"""Config resolution as unit tests: override coercion, one message per wrong key, trained sections."""

from __future__ import annotations

import pytest

from ddpm.config import ConfigError, load_config, parse_overrides, with_trained
from ddpm.pipeline.samples import SampleShard, plan_shards


@pytest.mark.parametrize("key, text, expected", [
    ("train.epochs", "3", 3),
    ("train.epochs", "1_000", 1000),
    ("train.lr", "5e-4", 5e-4),
    ("train.bf16", "no", False),
    ("train.bf16", "On", True),
    ("unet.channel_multipliers", "(1, 2)", (1, 2)),
    ("unet.channel_multipliers", "1,2,3", (1, 2, 3)),
    ("data.mirror", "none", None),
    ("data.mirror", "/some/folder", "/some/folder"),
    ("sample.sampler", "ddim", "ddim"),
    ("sample.compare", "ddpm, dpm++2m-sde:15@0", ("ddpm", "dpm++2m-sde:15@0")),
    ("sample.compare", "", ()),
])
def test_overrides_are_coerced_to_the_declared_type(key, text, expected):
    section, name = key.split(".")
    value = getattr(getattr(load_config("smoke", overrides={key: text}), section), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key, text, message", [
    ("train.epochs", "2.5", "train.epochs='2.5' is not a valid int"),
    ("train.bf16", "maybe", "train.bf16='maybe' is not a valid bool"),
    ("train.lr", "0", "train.lr=0.0 must be > 0"),
    ("train.batch_size", "0", "train.batch_size=0 must be >= 1"),
    ("cluster.sample_actors", "0", "cluster.sample_actors=0 must be >= 1"),
    ("sample.steps", "21", "sample.steps=21 must be in [1, diffusion.timesteps=20]"),
    ("sample.compare", "ddim:5,euler", "sample.compare entry 'euler': sampler 'euler' is not one of"),
    ("sample.compare", "ddpm:50", "sample.compare entry 'ddpm:50': ddpm takes all diffusion.timesteps steps"),
    ("sample.compare", "ddim:21", "sample.compare entry 'ddim:21': steps must be in [1, diffusion.timesteps=20]"),
    ("sample.compare", "ddim@-1", "sample.compare entry 'ddim@-1': write sampler[:steps][@guidance]"),
    ("sample.compare", "ddim:10,ddim", "sample.compare lists 'ddim' twice"),  # smoke's sample.steps is 10
    ("sample.compare_samples", "0", "sample.compare_samples=0 must be >= 1"),
    ("sample.noise", "numpy", "sample.noise='numpy': use one of generator, philox"),
    ("train.lr_schedule", "step", "train.lr_schedule='step': use one of constant, cosine, linear"),
    ("train.warmup_steps", "-1", "train.warmup_steps=-1 must be >= 0"),
    ("train.snr_gamma", "-5", "train.snr_gamma=-5.0 must be >= 0"),
    ("cluster.epoch_scoring", "driver", "cluster.epoch_scoring='driver': use one of auto, task, worker"),
    ("cluster.use_gpu", "maybe", "cluster.use_gpu='maybe': use true, false or auto"),
    ("cluster.workers", "1-x", "cluster.workers='1-x': write a count (2), or a range MIN-MAX"),
    ("cluster.workers", "[3, 2]", "cluster.workers=(3, 2): need 1 <= MIN <= MAX"),
])
def test_each_wrong_value_is_named_alone(key, text, message):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides={key: text})
    assert message in str(err.value)


def test_compare_sets_share_the_main_sets_seeds_and_name_themselves():
    from ddpm.samplers.sets import compare_sets

    cfg = load_config("smoke", overrides={"sample.compare": "ddpm,dpm++2m:8@0", "sample.guidance_scale": "2"})
    sets = compare_sets(cfg)
    assert list(sets) == ["ddpm-20", "dpmpp2m-8-w0"]  # MLflow metric names allow no '+'
    assert (sets["ddpm-20"].sampler, sets["ddpm-20"].guidance_scale) == ("ddpm", 2.0)
    assert (sets["dpmpp2m-8-w0"].steps, sets["dpmpp2m-8-w0"].guidance_scale) == (8, 0.0)
    for s in sets.values():
        assert (s.seed, s.batch_size, s.num_samples, s.compare) == (cfg.sample.seed, cfg.sample.batch_size, 32, ())
    few = load_config("smoke", overrides={"sample.num_samples": "20"})
    assert compare_sets(few)["ddim-5"].num_samples == 20  # never more seeds than the main set has


@pytest.mark.parametrize("classes, spec, guidance", [
    (10, "ddim:5", 1.0),      # a conditional model is scored by itself, not under the run's guidance 3
    (10, "ddim:5@0", 0.0),    # unless the spec names its own
    (10, "ddim:5@2.5", 2.5),
    (0, "ddim:5", 3.0),       # an unconditional model ignores guidance: the run's value is kept as it was
])
def test_epoch_scores_of_a_conditional_model_default_to_guidance_1(classes, spec, guidance):
    from ddpm.samplers.sets import epoch_fld_config

    cfg = load_config("smoke", overrides={"unet.num_classes": str(classes), "sample.guidance_scale": "3",
                                          "train.epoch_fld_sampler": spec})
    scored = epoch_fld_config(cfg).sample
    assert (scored.sampler, scored.steps, scored.guidance_scale) == ("ddim", 5, guidance)


def test_parse_overrides():
    assert parse_overrides(["a.b=1", " c.d = x=y "]) == {"a.b": "1", "c.d": "x=y"}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["novalue"])


def test_with_trained_takes_the_checkpoint_and_refuses_explicit_contradictions():
    trained = load_config("smoke")
    asked = load_config("gpu", overrides={"sample.num_samples": "7", "sample.steps": "10",
                                         "sample.compare": "ddim:10"})
    merged = with_trained(asked, trained, set(), "model.pt")
    assert merged.unet == trained.unet and merged.diffusion == trained.diffusion
    assert merged.sample.num_samples == 7 and merged.train == asked.train  # free sections stay as asked
    with pytest.raises(ConfigError, match=r"diffusion.timesteps=100 contradicts the trained model in model.pt"):
        with_trained(asked, trained, {"diffusion.timesteps"}, "model.pt")
    with_trained(load_config("smoke"), trained, {"diffusion.timesteps"}, "model.pt")  # agreeing is fine
    assert asked.unet != trained.unet  # the merge replaced the asked sections on a copy, not in place


@pytest.mark.parametrize("num, batch, shards", [(40, 8, 1), (40, 8, 2), (40, 8, 5), (40, 8, 9), (41, 8, 3),
                                                (1, 500, 4), (10_000, 500, 8)])
def test_plan_shards_covers_every_image_once_on_batch_boundaries(num, batch, shards):
    plan = plan_shards(num, batch, shards)
    assert [s.index for s in plan] == list(range(len(plan)))
    assert plan[0].start == 0 and sum(s.count for s in plan) == num
    for a, b in zip(plan, plan[1:], strict=False):
        assert b.start == a.start + a.count
    assert all(s.start % batch == 0 and s.count > 0 for s in plan)
    batches = -(-num // batch)
    assert len(plan) == min(shards, batches)
    sizes = [-(-s.count // batch) for s in plan]  # batches per shard: as even as possible
    assert max(sizes) - min(sizes) <= 1


def test_plan_shards_example():
    assert plan_shards(20, 8, 2) == [SampleShard(0, 0, 16), SampleShard(1, 16, 4)]


def test_profiles_say_what_they_are():
    from ddpm.models import build_unet, count_parameters

    original = load_config("original")
    assert (original.unet.init, original.train.ema_decay, original.train.grad_clip, original.train.weight_decay,
            original.train.lr, original.train.batch_size, original.diffusion.timesteps, original.train.epochs,
            original.sample.sampler, original.sample.num_samples) == \
        ("flux", 0.0, 0.0, 0.0, 1e-3, 32, 100, 15, "ddpm", 10_000)
    assert count_parameters(build_unet(original.unet, original.diffusion.timesteps)) == 403_409
    for name in ("cpu", "gpu", "original"):  # every real profile makes the pipeline's 10,000 samples
        assert load_config(name).sample.num_samples == 10_000
    cpu = load_config("cpu")
    assert (cpu.cluster.workers, cpu.cluster.sample_actors, cpu.sample.sampler) == ((1, 1), 1, "dpm++2m-sde")
    assert (original.train.export, cpu.train.export) == ("last", "best")  # the original keeps its last epoch
    assert cpu.sample.steps <= 25  # the fast sampler's promise
    gpu = load_config("gpu")  # the fast path on a GPU; the CPU keeps what measured fastest there
    assert (gpu.sample.noise, gpu.train.check_every, gpu.train.fused_optimizer) == ("philox", 50, True)
    assert (cpu.sample.noise, cpu.train.check_every, cpu.train.cpu_bf16) == ("generator", 1, True)
    # The recipe tuned for the cpu budget (docs/results.md); the original keeps its constant rate, all timesteps alike.
    assert (cpu.train.lr_schedule, cpu.train.warmup_steps, cpu.train.snr_gamma) == ("cosine", 500, 5.0)
    # ... and digit-conditional, sampled by its conditional network alone (guidance above 1 raised the FLD)
    assert (cpu.unet.num_classes, cpu.sample.guidance_scale, original.unet.num_classes) == (10, 1.0, 0)
    assert (original.train.lr_schedule, original.train.warmup_steps, original.train.snr_gamma) == ("constant", 0, 0.0)


def test_the_old_steps_key_is_still_read(tmp_path):
    """sample.ddim_steps became sample.steps: --set, config files and configs saved by earlier versions (run
    folders, checkpoints) may still say ddim_steps."""
    from ddpm.config import config_from_dict

    assert load_config("smoke", overrides={"sample.ddim_steps": "7"}).sample.steps == 7
    (tmp_path / "old.toml").write_text("[sample]\nddim_steps = 6\n")
    assert load_config("smoke", config_file=tmp_path / "old.toml").sample.steps == 6
    saved = load_config("smoke").to_dict()
    saved["sample"]["ddim_steps"] = saved["sample"].pop("steps") - 1
    assert config_from_dict(saved).sample.steps == load_config("smoke").sample.steps - 1
    with pytest.raises(ConfigError, match=r"sample.steps=21 must be in \[1, diffusion.timesteps=20\]"):
        load_config("smoke", overrides={"sample.ddim_steps": "21"})


@pytest.mark.parametrize("text, workers", [("2", (2, 2)), ("1-4", (1, 4)), ("[1, 4]", (1, 4)), ("(2, 3)", (2, 3))])
def test_workers_are_a_pair_written_as_a_count_or_a_range(text, workers):
    assert load_config("smoke", overrides={"cluster.workers": text}).cluster.workers == workers


@pytest.mark.parametrize("text, use_gpu", [("true", True), ("false", False), ("auto", None), ("", None)])
def test_use_gpu_is_a_bool_or_auto(text, use_gpu):
    assert load_config("smoke", overrides={"cluster.use_gpu": text}).cluster.use_gpu is use_gpu


def test_the_cluster_section_is_written_by_hand_in_toml(tmp_path):
    (tmp_path / "c.toml").write_text("[cluster]\nworkers = [1, 4]\nuse_gpu = true\nepoch_scoring = \"task\"\n")
    cluster = load_config("smoke", config_file=tmp_path / "c.toml").cluster
    assert (cluster.workers, cluster.use_gpu, cluster.epoch_scoring) == ((1, 4), True, "task")
    (tmp_path / "n.toml").write_text("[cluster]\nworkers = 2\n")
    assert load_config("smoke", config_file=tmp_path / "n.toml").cluster.workers == (2, 2)


def test_the_old_orchestration_keys_are_still_read(tmp_path):
    """train.num_workers, use_gpu, max_failures, epoch_fld_where and sample.num_actors moved to `cluster`: --set,
    config files and their old values ("1-4", "auto"/"true"/"false") still work."""
    old = {"train.num_workers": "1-2", "train.use_gpu": "true", "train.max_failures": "5",
           "train.epoch_fld_where": "worker", "sample.num_actors": "3"}
    cluster = load_config("smoke", overrides=old).cluster
    assert (cluster.workers, cluster.use_gpu, cluster.max_failures, cluster.epoch_scoring, cluster.sample_actors) \
        == ((1, 2), True, 5, "worker", 3)
    (tmp_path / "old.toml").write_text('[train]\nnum_workers = "2"\nuse_gpu = "auto"\n')
    cluster = load_config("smoke", config_file=tmp_path / "old.toml").cluster
    assert (cluster.workers, cluster.use_gpu) == ((2, 2), None)
    with pytest.raises(ConfigError, match=r"cluster.workers=\(3, 2\): need 1 <= MIN <= MAX"):
        load_config("smoke", overrides={"train.num_workers": "3-2"})


def test_a_run_folder_saved_before_the_cluster_section_loads(tmp_path):
    """tests/data/config_before_cluster.json is a smoke config.json as Config.to_json wrote it before the move (with
    train.num_workers="1-2", use_gpu="false", max_failures=3, epoch_fld_where="task", sample.num_actors=2): a run
    folder or checkpoint holding it loads with the same settings, and everything else as the smoke profile."""
    import shutil
    from pathlib import Path

    from ddpm.pipeline.run_folder import RunPaths, read_config

    shutil.copy(Path(__file__).parent / "data" / "config_before_cluster.json", tmp_path / "config.json")
    cfg = read_config(RunPaths(tmp_path))
    assert (cfg.cluster.workers, cfg.cluster.use_gpu, cfg.cluster.max_failures, cfg.cluster.epoch_scoring,
            cfg.cluster.sample_actors) == ((1, 2), False, 3, "task", 2)
    smoke = load_config("smoke")
    assert (cfg.unet, cfg.diffusion, cfg.train, cfg.sample) == (smoke.unet, smoke.diffusion, smoke.train, smoke.sample)
