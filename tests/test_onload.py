"""Layer-wise onloading (``engine.onload=true``, models/onload.py): blocks read from the checkpoint's shards one at a
time and the pruned ones written out shard by shard give the run an in-memory model gives (same run id, weights,
sparsity, perplexity), with at most one block real at any moment; what cannot run that way is refused before work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from models import adapter_for
from models.loading import TINY_DIR
from models.onload import ShardedBlocks, load_onloaded
from runners.run import execute
from runners.validate import ConfigError, validate

from .conftest import compose

COMMON = ["calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false", "wandb.mode=disabled", "sweep=o"]


def folder_weights(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("model,extra", [("tiny-llama", []), ("tiny-opt", []), ("tiny-mixtral", []), ("tiny-gpt2", []),
                                         ("tiny-llama", ["pruner=wanda", "sparsity.allocation=owl"]),
                                         ("tiny-mixtral", ["pruner=expert_drop", "sparsity=experts"])])
def test_an_onloaded_prune_equals_the_in_memory_one(model, extra, tmp_path):
    """(With OWL: its dense pass reads the blocks and writes nothing. tiny-mixtral: experts fused in the checkpoint,
    one linear per expert in memory; tiny-gpt2: Conv1D weights in the checkpoint, linears in memory; expert_drop:
    2 of 8 experts gone from every block as it passes, the config and structure file written as save_pruned does.)"""
    args = [*COMMON, f"model={model}", "pruner=sparsegpt", "dense_baseline=true", "save_model=true", *extra]
    if "sparsity=experts" in extra:
        args.remove("pruner=sparsegpt")
    whole = execute(compose(*args, f"output_root={tmp_path / 'whole'}"))
    onloaded = execute(compose(*args, "engine.onload=true", f"output_root={tmp_path / 'onloaded'}"))
    assert onloaded["run_id"] == whole["run_id"]
    assert onloaded["metrics"]["ppl"] == whole["metrics"]["ppl"] and onloaded["sparsity"] == whole["sparsity"]
    assert onloaded.get("structure") == whole.get("structure")
    dense = [execute(compose(*args, "pruner=dense", f"output_root={tmp_path / k}", *extra))["metrics"]["ppl"]
             for k, extra in (("whole", []), ("onloaded", ["engine.onload=true"]))]
    assert dense[0] == dense[1]
    folder = tmp_path / "onloaded" / "o" / onloaded["run_id"] / "model"
    assert not (folder.parent / "partial").exists()
    # the pruned checkpoint, written block by block, reloads with plain from_pretrained, equal to the in-memory one
    # (under the names save_pretrained writes: Mixtral's experts as block_sparse_moe.experts.<e>.w1 / w3 / w2)
    assert set(folder_weights(folder)) == set(folder_weights(tmp_path / "whole" / "o" / whole["run_id"] / "model"))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "o" / whole["run_id"] / "model",
                                                 dtype=torch.float32).state_dict()
    assert reloaded.keys() == saved.keys() and all(torch.equal(reloaded[k], saved[k]) for k in saved)


def test_at_most_one_block_is_real_at_a_time(tmp_path):
    from evaluators.ppl import perplexity
    from models.registry import adapter_class
    from pruners import Pattern, build_pruner
    from pruners.settings import EngineSettings

    real = []

    class Counting(ShardedBlocks):
        def fetch(self, index, block):
            real.append(sum(not next(b.parameters()).is_meta for b in adapter.blocks()))
            super().fetch(index, block)

    model = load_onloaded(TINY_DIR / "tiny-llama", torch.float32, None, adapter_class("llama"))
    adapter = adapter_for(model)
    model.prunelab_blocks = Counting(TINY_DIR / "tiny-llama", adapter.blocks_prefix(), tmp_path / "pruned")
    assert all(p.is_meta for block in adapter.blocks() for p in block.parameters())
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    build_pruner({"name": "wanda"}).prune(model, adapter, Pattern("unstructured", 0.5), ids,
                                          EngineSettings(progress=False, batch_size=2))
    model.prunelab_blocks.finish(model)
    model.prunelab_blocks = Counting(tmp_path / "pruned", adapter.blocks_prefix())
    perplexity(model, adapter, ids, progress=False)
    assert len(real) == 8 and max(real) == 0  # every fetch: no other block real
    assert set(folder_weights(tmp_path / "pruned")) >= {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)}
    # a structured method: the scoring pass, then compensation and removal, one block at a time as well
    real.clear()
    model = load_onloaded(TINY_DIR / "tiny-llama", torch.float32, None, adapter_class("llama"))
    adapter = adapter_for(model)
    model.prunelab_blocks = Counting(TINY_DIR / "tiny-llama", adapter.blocks_prefix(), tmp_path / "flap")
    build_pruner({"name": "flap"}).prune(model, adapter, Pattern("structured", 0.3), ids,
                                         EngineSettings(progress=False, batch_size=2))
    assert len(real) == 8 and max(real) == 0
    assert len(list((tmp_path / "flap").glob("block-*.safetensors"))) == 4


def test_a_structured_prune_onloaded_equals_the_in_memory_one(tmp_path):
    """FLAP (scoring pass, then compensation and removal block by block): the scoring pass reads each block and
    writes nothing; the pruned blocks, written out with their own shapes and added biases, are the in-memory run's,
    and the run reloads through the structure file."""
    from models import load

    for method in ("flap",):  # (Numerical Pruning onloaded: tests/test_resume.py, against an in-memory run)
        args = [*COMMON, "model=tiny-llama", f"pruner={method}", "sparsity=structured", "sparsity.ratio=0.3",
                "dense_baseline=false", "save_model=true", "speed.mode=never", "calib.nsamples=4"]
        whole = execute(compose(*args, f"output_root={tmp_path / 'whole'}"))
        onloaded = execute(compose(*args, "engine.onload=true", f"output_root={tmp_path / 'onloaded'}"))
        assert onloaded["run_id"] == whole["run_id"] and onloaded["structure"] == whole["structure"]
        assert onloaded["metrics"]["ppl"] == whole["metrics"]["ppl"] and onloaded["sparsity"] == whole["sparsity"]
        folders = [tmp_path / k / "o" / whole["run_id"] / "model" for k in ("whole", "onloaded")]
        saved, written = (folder_weights(f) for f in folders)
        assert saved.keys() == written.keys() and all(torch.equal(saved[k], written[k]) for k in saved), method
        reloaded = load(compose(*args, f"model.path={folders[1]}").model).model
        assert sum(p.numel() for p in reloaded.parameters()) == whole["structure"]["parameters_after"]


@pytest.mark.parametrize("overrides,message", [
    (["pruner=surgeon"], "engine.onload=true: pruner 'surgeon' does not go block by block"),
    (["pruner=llm_pruner", "sparsity=structured"], "engine.onload=true: pruner 'llm_pruner' does not go block by block"),
    (["eval=tiny-zeroshot"], "engine.onload=true: eval.zeroshot needs the whole model in this process"),
    (["model=tiny-imagegen", "calib=generated", "eval=image"], "engine.onload=true: llamagen models cannot be onloaded"),
    (["model=smollm2"], "engine.onload=true: model.gguf_file"),
    (["eval.ppl.mode=full"], "engine.onload=true: eval.ppl.mode=full needs the whole model"),
])
def test_what_cannot_run_onloaded_is_refused_before_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose("engine.onload=true", *overrides))


def test_a_checkpoint_saved_from_the_base_model_is_onloaded(tmp_path):
    """Tensor names without the base model's prefix (``decoder.layers.<k>...``, as the facebook/opt checkpoints
    store them): the blocks are found all the same, and perplexity is the in-memory model's."""
    import shutil

    from safetensors.torch import save_file

    from evaluators.ppl import perplexity
    from models.registry import adapter_class

    source = TINY_DIR / "tiny-opt"
    state = load_file(source / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(source / "config.json", tmp_path / "config.json")
    model = load_onloaded(tmp_path, torch.float32, None, adapter_class("opt"))
    assert model.prunelab_blocks.read_prefix == "decoder.layers"
    whole = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    assert perplexity(model.eval(), adapter_for(model), ids, progress=False) == \
        perplexity(whole, adapter_for(whole), ids, mode="sequential", progress=False)


def test_a_mixtral_checkpoint_with_fused_experts_is_onloaded(tmp_path):
    """Mixtral's hub checkpoints (and the bundled tiny-mixtral) name each expert's linears
    ``block_sparse_moe.experts.<e>.w1 / w3 / w2``; transformers 5 also reads the fused layout it holds in memory
    (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``). That layout, read block by block through the adapter, gives the
    in-memory perplexity too."""
    import shutil

    from safetensors.torch import save_file

    from evaluators.ppl import perplexity
    from models.registry import adapter_class

    source = TINY_DIR / "tiny-mixtral"
    assert any(".block_sparse_moe.experts.0.w1." in k for k in load_file(source / "model.safetensors"))
    whole = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    adapter = adapter_for(whole)
    fused = {k: v.contiguous() for k, v in adapter.native_state(whole.state_dict()).items()
             if not k.endswith("lm_head.weight")}  # (tied to the embedding)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", tmp_path / "config.json")
    model = load_onloaded(tmp_path, torch.float32, None, adapter_class("mixtral"))
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    assert perplexity(model.eval(), adapter_for(model), ids, progress=False) == \
        perplexity(whole, adapter, ids, mode="sequential", progress=False)


def test_a_checkpoint_whose_experts_were_dropped_evenly_prunes_onloaded_as_in_memory(tmp_path):
    """REAP, then SparseGPT on what it kept: a pruned checkpoint whose config says its shapes (every MoE layer 6 of 8
    experts) is onloaded as any checkpoint, with the in-memory run's result; one whose blocks differ is refused."""
    dropped = execute(compose(*COMMON, "model=tiny-mixtral", "pruner=expert_drop", "sparsity=experts",
                              "save_model=true", f"output_root={tmp_path / 'drop'}"))
    folder = tmp_path / "drop" / "o" / dropped["run_id"] / "model"
    args = [*COMMON, "model=local", f"model.path={folder}", "model.seqlen=256", "pruner=sparsegpt"]
    whole = execute(compose(*args, f"output_root={tmp_path / 'whole'}"))
    onloaded = execute(compose(*args, "engine.onload=true", f"output_root={tmp_path / 'onloaded'}"))
    assert onloaded["metrics"]["ppl"] == whole["metrics"]["ppl"] and onloaded["sparsity"] == whole["sparsity"]
    import json

    structure = json.loads((folder / "prunelab_structure.json").read_text())
    structure["plain_from_pretrained"] = False
    (folder / "prunelab_structure.json").write_text(json.dumps(structure))
    with pytest.raises(ConfigError, match="is a structurally pruned checkpoint whose blocks differ in shape"):
        validate(compose(*args, "engine.onload=true"))


def test_zero_shot_of_an_onloaded_run_is_lm_eval_s_command_on_its_checkpoint(tmp_path):
    """``eval.zeroshot.backend=cli`` with ``engine.onload=true``: lm-eval's own command reads the pruned checkpoint the
    run wrote (nothing else saved), with the accuracies of the in-memory path on the same pruned model."""
    args = [*COMMON, "model=tiny-llama", "pruner=wanda", "eval=tiny-zeroshot", "eval.ppl.datasets=[]",
            "eval.zeroshot.limit=8", "eval.zeroshot.batch_size=8", "dense_baseline=false"]
    whole = execute(compose(*args, f"output_root={tmp_path / 'whole'}"))
    onloaded = execute(compose(*args, "engine.onload=true", "eval.zeroshot.backend=cli",
                               f"output_root={tmp_path / 'onloaded'}"))
    theirs, mine = onloaded["metrics"]["zeroshot"], whole["metrics"]["zeroshot"]
    model_args = theirs["cli"]["command"][theirs["cli"]["command"].index("--model_args") + 1]
    assert f"pretrained={tmp_path / 'onloaded' / 'o' / onloaded['run_id'] / 'model'}," in model_args
    for task, accuracy in mine["tasks"].items():
        assert theirs["tasks"][task]["acc"] == pytest.approx(accuracy["acc"], abs=1e-12), task
