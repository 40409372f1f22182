"""The generate-and-split protocol: seeded generation, the 2-means split and its rules, the
user's override, the saved folders, and the whole path generate -> split -> unlearn -> sample."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from sd_fixtures import one_thread, quick_config, tiny_clip, tiny_sd_model  # noqa: F401  (fixtures)

from retrack.backends.latent import LatentBackend
from retrack.engine import save_model
from retrack.grids import samples_grid
from retrack.images import list_image_files, load_images
from retrack.metrics import ClipScorer, calibrate_threshold
from retrack.neighbours import knn
from retrack.cli import main
from retrack.split import (
    PAPER_GENERATIONS, Split, cluster_split, default_generations, evaluate_prompt, generate, generate_and_split,
    unlearn_prompt,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a painting of a lighthouse at dusk"


def embeddings_with_copies(n_copies: int = 6, n_varied: int = 10, dim: int = 32, seed: int = 0):
    """n_copies near-identical embeddings (near-copies of one training image) followed by
    n_varied embeddings pointing in unrelated directions; also returns the copies' direction."""
    g = torch.Generator().manual_seed(seed)
    copied = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    copies = copied + 0.05 * torch.randn(n_copies, dim, generator=g)
    varied = torch.randn(n_varied, dim, generator=g)
    return torch.cat([copies, varied]), copied, varied


def test_the_tighter_cluster_is_the_memorised_one():
    embeddings, _, _ = embeddings_with_copies()
    labels, memorised, rule, clusters = cluster_split(embeddings)
    assert memorised == list(range(6)) and rule == "tighter"
    assert len(labels) == 16 and sorted(c.size for c in clusters) == [6, 10]
    chosen = clusters[labels[0]]
    assert chosen.tightness == max(c.tightness for c in clusters) and chosen.reference_similarity is None


def test_a_reference_image_decides_which_cluster_is_memorised():
    embeddings, copied, varied = embeddings_with_copies()
    assert cluster_split(embeddings, reference=copied)[1:3] == (list(range(6)), "reference")
    # A reference that looks like the varied images makes them the memorised set instead.
    assert cluster_split(embeddings, reference=varied.mean(0))[1] == list(range(6, 16))


def test_a_single_outlier_is_never_called_memorised():
    g = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    embeddings = torch.cat([direction + 0.3 * torch.randn(9, 32, generator=g), -direction[None]])
    labels, memorised, _, clusters = cluster_split(embeddings)
    assert sorted(c.size for c in clusters) == [1, 9] and memorised == list(range(9))


def test_too_few_images_are_refused():
    with pytest.raises(ValueError, match="too few"):
        cluster_split(torch.randn(3, 8))


def make_split(n: int = 6) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    return Split(prompt=PROMPT, seeds=list(range(10, 10 + n)), images=images, memorised=[0, 1], rule="tighter",
                 labels=[0, 0, 1, 1, 1, 1][:n])


def test_the_user_can_override_the_split():
    split = make_split()
    fixed = split.with_memorised([4, 2, 2])
    assert fixed.memorised == [2, 4] and fixed.retained == [0, 1, 3, 5] and fixed.rule == "user"
    assert torch.equal(fixed.forget_images(), split.images[[2, 4]])
    assert torch.equal(fixed.retain_images(), split.images[[0, 1, 3, 5]])
    assert split.memorised == [0, 1]  # the original is left as it was
    for bad, message in (([], "empty"), ([7], "do not exist"), (range(6), "nothing would be left")):
        with pytest.raises(ValueError, match=message):
            split.with_memorised(bad)


def test_a_saved_split_is_two_image_folders_the_cli_reads(tmp_path):
    split = make_split().with_memorised([1, 3])
    folder = split.save(tmp_path / "split")
    forget, retain = list_image_files(folder / "forget"), list_image_files(folder / "retain")
    assert [p.name for p in forget] == ["001_seed11.png", "003_seed13.png"] and len(retain) == 4
    record = json.loads((folder / "split.json").read_text())
    assert record["memorised"] == [1, 3] and record["rule"] == "user" and record["seeds"] == split.seeds
    assert (folder / "grid.png").is_file()
    reloaded = load_images(forget, 32, 3).tensor  # PNG round trip: within one 8-bit step
    assert (reloaded - split.forget_images()).abs().max() <= 1 / 127.5 + 1e-6
    with pytest.raises(FileExistsError):
        split.save(folder)


def test_generation_is_seeded_per_image(tiny_sd_model):
    backend = LatentBackend.from_pretrained(tiny_sd_model)
    first = generate(backend, PROMPT, n=4, seed=3, steps=3, batch_size=3)
    again = generate(backend, PROMPT, n=4, seed=4, steps=3)
    assert first.seeds == [3, 4, 5, 6] and first.images.shape == (4, 3, 32, 32)
    # Image i depends on seed i only, not on its batch: seed 4 is the same image in both calls.
    torch.testing.assert_close(first.images[1:], again.images[:3], atol=1e-5, rtol=0)
    assert not torch.allclose(first.images[0], first.images[1])
    with pytest.raises(ValueError, match="empty"):
        generate(backend, "  ", n=4)


# A random CLIP cannot tell copies from other images; calibrate_threshold rightly says so.
@pytest.mark.filterwarnings("ignore:retain images reach similarity")
def test_the_whole_path_generate_split_unlearn_sample(tiny_sd_model, tiny_clip, tmp_path):
    backend = LatentBackend.from_pretrained(tiny_sd_model)
    scorer = ClipScorer.load(str(tiny_clip), device="cpu")
    split = generate_and_split(backend, PROMPT, scorer, n=8, seed=0, steps=3)
    assert split.seeds == list(range(8)) and split.rule == "tighter"
    assert split.memorised and split.retained and sorted(split.memorised + split.retained) == list(range(8))

    threshold = calibrate_threshold(scorer.image_features(split.forget_images()), scorer.image_features(split.retain_images()))
    before = evaluate_prompt(backend, PROMPT, scorer, split.forget_images(), threshold, n=4, seed=100, steps=3)
    result = unlearn_prompt(backend, split.forget_images(), split.retain_images(), PROMPT, quick_config(), knn_cache=None)
    after = evaluate_prompt(backend, PROMPT, scorer, split.forget_images(), threshold, n=4, seed=100, steps=3)

    # The neighbours were searched among the retain set's VAE latents.
    forget_x0, retain_x0 = backend.encode(split.forget_images()), backend.encode(split.retain_images())
    assert torch.equal(result.neighbours, knn(forget_x0, retain_x0, result.config.k)[1])
    assert before.samples.seeds == after.samples.seeds and not torch.equal(before.samples.images, after.samples.images)
    assert before.clip_similarity.shape == (4,) and -1 <= before.text_score <= 1
    # The prompt score (collateral damage): the non-copies' mean CLIP cosine to the prompt.
    cosines = (scorer.image_features(before.samples.images) @ scorer.text_features([PROMPT]).T)[:, 0]
    copies = before.copies()
    clean = torch.from_numpy(~copies.get("l2", copies["clip"]))
    assert clean.any() and before.quality_figures["prompt_score"] == pytest.approx(float(cosines[clean].mean()))
    summary = after.summary()
    assert summary["success"] == (summary["memorisation_rate"] == 0.0) and summary["threshold"] == threshold
    assert samples_grid(before).size == samples_grid(after).size
    # The split's retained generations play the oracle: each rate is also read as the excess over them.
    read = evaluate_prompt(backend, PROMPT, scorer, split.forget_images(), threshold, n=4, seed=100, steps=3,
                           retained_images=split.retain_images())
    assert set(read.summary()["excess_over_oracle"]) == {"l2", "clip"} and before.summary()["excess_over_oracle"] == {}
    np.testing.assert_array_equal(read.clip_similarity, after.clip_similarity)

    out = save_model(backend, tmp_path / "unlearned", result.metadata(prompt=PROMPT))
    reloaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert all(torch.equal(v, backend.unet.state_dict()[k]) for k, v in reloaded.unet.state_dict().items())


def test_cli_split_unlearn_with_lora_then_evaluate_before_and_after(tiny_sd_model, tiny_clip, tiny_pixel_model, tmp_path, capsys):
    folder, adapter, evaluation = tmp_path / "split", tmp_path / "adapter", tmp_path / "eval"
    common = ["--prompt", PROMPT, "--n", "6", "--steps", "2", "--clip", str(tiny_clip), "--device", "cpu"]
    assert main(["split", "--model", str(tiny_sd_model), *common, "--memorised", "1,4", "--out", str(folder)]) == 0
    assert [p.name for p in list_image_files(folder / "forget")] == ["001_seed1.png", "004_seed4.png"]
    assert len(list_image_files(folder / "retain")) == 4 and "retrack unlearn" in capsys.readouterr().out

    assert main(["unlearn", "--model", str(tiny_sd_model), "--forget", str(folder / "forget"), "--retain", str(folder / "retain"),
                 "--prompt", PROMPT, "--train-prompt", "a lighthouse", "--lora-rank", "2", "--k", "2", "--steps", "1",
                 "--accum", "1", "--lr", "1e-3", "--device", "cpu", "--out", str(adapter)]) == 0
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()

    assert main(["sd-eval", "--model", str(tiny_sd_model), str(adapter), *common, "--forget", str(folder / "forget"),
                 "--retain", str(folder / "retain"), "--out", str(evaluation)]) == 0
    records = json.loads((evaluation / "metrics.json").read_text())
    assert [r["model"] for r in records] == [str(tiny_sd_model), str(adapter)]
    assert records[0]["threshold"] == records[1]["threshold"] and records[0]["seeds"] == records[1]["seeds"]
    assert records[0]["similarity"] != records[1]["similarity"]  # the adapter changed what the model draws
    assert all(Path(r["grid"]).is_file() for r in records)

    capsys.readouterr()
    assert main(["split", "--model", str(tiny_sd_model), *common, "--memorised", "1,x", "--out", str(tmp_path / "x")]) == 2
    assert "image numbers" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(tiny_pixel_model), "--forget", str(folder / "forget"), "--lora-rank", "2",
                 "--out", str(tmp_path / "y")]) == 2
    assert "only for Stable Diffusion models" in capsys.readouterr().err


def test_protocol_defaults_follow_the_paper_on_a_gpu_and_say_so_on_the_cpu(tiny_sd_model, tiny_clip, tmp_path, capsys):
    """The paper splits 128 generations per prompt and fine-tunes on a modified prompt. On a GPU
    the split generates 128 by default; on the CPU 16, and the CLI says so. Unlearning on the
    memorised prompt itself works but says what the paper did."""
    assert default_generations("cuda") == default_generations("cuda:1") == PAPER_GENERATIONS == 128
    assert default_generations("cpu") == 16
    folder = tmp_path / "split"
    assert main(["split", "--model", str(tiny_sd_model), "--prompt", PROMPT, "--steps", "1", "--clip", str(tiny_clip),
                 "--device", "cpu", "--memorised", "0,1", "--out", str(folder)]) == 0
    assert len(json.loads((folder / "split.json").read_text())["seeds"]) == 16
    err = capsys.readouterr().err
    assert "note: generating 16 images; the paper generates 128 per prompt (the default on a GPU; this runs on the CPU)" in err

    assert main(["unlearn", "--model", str(tiny_sd_model), "--forget", str(folder / "forget"), "--retain",
                 str(folder / "retain"), "--prompt", PROMPT, "--k", "2", "--steps", "1", "--accum", "1",
                 "--device", "cpu", "--out", str(tmp_path / "clean")]) == 0
    assert "the paper fine-tunes on a modified prompt (--train-prompt)" in capsys.readouterr().err
