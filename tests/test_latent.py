"""The Stable Diffusion (latent) backend on a tiny random pipeline: encoding, conditioning,
guided sampling, the shared objective, full-UNet and LoRA unlearning, and what gets saved."""

import json

import open_clip
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DModel
from safetensors.torch import load_file
from helpers import folder_digest
from sd_fixtures import one_thread, quick_config, random_images, tiny_sd_download, tiny_sd_model  # noqa: F401  (fixtures)

from retrack import objectives
from retrack.backends import PixelBackend, load_backend, model_family
from retrack.backends.latent import LORA_REFERENCE_FILE, LORA_WEIGHTS_FILE, LatentBackend
from retrack.engine import save_model
from retrack.sampling import initial_noise, sample
from retrack.split import unlearn_prompt
from retrack.testing import build_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a painting of a lighthouse at dusk"


def unet_weights(backend: LatentBackend) -> dict:
    return {k: v.detach().clone() for k, v in backend.unet.state_dict().items()}


@pytest.fixture
def backend(tiny_sd_model):
    return LatentBackend.from_pretrained(tiny_sd_model)


def test_load_backend_picks_the_latent_family(tiny_sd_model):
    assert model_family(tiny_sd_model) == "latent"
    backend = load_backend(tiny_sd_model)
    assert isinstance(backend, LatentBackend) and backend.family == "latent"
    assert backend.x0_shape == (4, 4, 4) and backend.image_size == 32 and backend.channels == 3
    # The training schedule is SD's own (scaled-linear betas), and latents are never clipped.
    assert backend.scheduler.config.beta_schedule == "scaled_linear" and not backend.scheduler.config.clip_sample


def test_encode_gives_scaled_posterior_means_without_gradients(backend):
    images = random_images(3, seed=1)
    latents = backend.encode(images, batch_size=2)
    assert latents.shape == (3, *backend.x0_shape) and latents.device.type == "cpu"
    expected = backend.vae.encode(images).latent_dist.mean * backend.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    assert torch.equal(latents, backend.encode(images, batch_size=2))  # deterministic: the k-NN cache relies on it
    assert not latents.requires_grad
    assert backend.decode(latents).shape == images.shape
    with pytest.raises(ValueError, match="do not fit"):
        backend.encode(random_images(1, seed=1, size=64))


def test_only_the_unet_is_trainable(backend):
    assert not any(p.requires_grad for p in backend.vae.parameters())
    assert not any(p.requires_grad for p in backend.text_encoder.parameters())
    assert sum(p.numel() for p in backend.trainable_parameters()) == sum(p.numel() for p in backend.unet.parameters())


def test_prompts_use_the_real_clip_tokenizer(backend):
    ids = backend.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True).input_ids[0]
    reference = open_clip.get_tokenizer("ViT-B-32")([PROMPT])[0].tolist()
    n = reference.index(49407) + 1  # up to and including <|endoftext|>; the padding token differs
    assert ids[:n] == reference[:n]
    embeddings = backend.encode_prompt([PROMPT, "a dog"])
    assert embeddings.shape == (2, 77, backend.text_encoder.config.hidden_size)
    assert not torch.equal(embeddings[0], embeddings[1])


def test_guided_sampling_matches_the_diffusers_pipeline(backend):
    """Our seeded DDIM sampler with classifier-free guidance gives what StableDiffusionPipeline
    gives from the same initial latents."""
    cond = backend.encode_prompt([PROMPT])
    ours = sample(backend, 2, seed=5, steps=4, cond=cond, guidance=7.5).images
    pipe = backend.pipeline()
    pipe.scheduler = DDIMScheduler.from_config(backend.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cond.expand(2, -1, -1), negative_prompt_embeds=backend.empty_prompt().expand(2, -1, -1),
                  latents=initial_noise(backend.x0_shape, [5, 6]), num_inference_steps=4, guidance_scale=7.5,
                  output_type="pt").images
    torch.testing.assert_close(ours, theirs * 2 - 1, atol=1e-5, rtol=0)


def test_the_retrack_loss_is_one_function_for_both_families(backend, tiny_sd_model):
    """Same tensors in, same number out: the latent family only supplies the network call (with
    its text conditioning); the loss is objectives.retrack, exactly as for pixel models."""
    g = torch.Generator().manual_seed(3)
    forget = torch.randn(2, *backend.x0_shape, generator=g)
    batch = objectives.Batch(forget=forget, neighbours=torch.randn(2, 3, *backend.x0_shape, generator=g),
                             retain=torch.randn(2, *backend.x0_shape, generator=g))
    cond = backend.encode_prompt([PROMPT])
    per_row = {"forget_cond": cond.expand(2, -1, -1), "retain_cond": cond.expand(2, -1, -1)}  # as the engine passes it
    params = objectives.Params(lam=0.5)

    # A pixel backend over the same 4 x 4 x 4 tensors, with the latent model's noise schedule.
    pixel_unet = UNet2DModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                             down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    pixel = PixelBackend(pixel_unet.eval(), DDPMScheduler.from_config(backend.scheduler.config))
    # ...whose network is, for this comparison, the latent UNet called with the prompt.
    pixel.unet.forward = lambda x_t, t: backend.unet(x_t, t, encoder_hidden_states=cond.expand(x_t.shape[0], -1, -1))

    with torch.no_grad():
        latent_terms = objectives.retrack(backend.denoise, objectives.Batch(**{**vars(batch), **per_row}),
                                          backend.schedule, torch.Generator().manual_seed(0), params)
        pixel_terms = objectives.retrack(pixel.denoise, batch, pixel.schedule, torch.Generator().manual_seed(0), params)
    assert torch.equal(latent_terms.loss, pixel_terms.loss)
    assert torch.equal(latent_terms.unlearn, pixel_terms.unlearn) and torch.equal(latent_terms.retain, pixel_terms.retain)

    # And that number is METHOD.md's formula, recomputed by hand from the network's inputs and outputs.
    calls = []

    def recording(x_t, t, c):
        out = backend.denoise(x_t, t, c)
        calls.append((x_t, t, out))
        return out

    with torch.no_grad():
        terms = objectives.retrack(recording, objectives.Batch(**{**vars(batch), **per_row}),
                                   backend.schedule, torch.Generator().manual_seed(0), params)
    # One call per branch on the CPU (objectives.predict_noise); joined, they are the fused call's rows.
    x_t, t, eps_pred = (torch.cat(parts) for parts in zip(*calls))
    abar = backend.scheduler.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    gamma, sigma = abar.sqrt(), (1 - abar).sqrt()
    xu_t, xr_t, pred_u, pred_r = x_t[:2].double(), x_t[2:].double(), eps_pred[:2].double(), eps_pred[2:].double()
    v = (xu_t[:, None] - gamma[:2, None] * batch.neighbours.double()) / sigma[:2, None]
    pi = torch.softmax(-0.5 * v.pow(2).flatten(2).sum(2), dim=1)
    unlearn_loss = (pi * (pred_u[:, None] - v).pow(2).flatten(2).sum(2)).sum(1).mean()
    eps_r = (xr_t - gamma[2:] * batch.retain.double()) / sigma[2:]
    retain_loss = (pred_r - eps_r).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms.loss.double(), 0.5 * unlearn_loss + 0.5 * retain_loss, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd_model):
    grads = []
    for checkpointing in (False, True):
        backend = LatentBackend.from_pretrained(tiny_sd_model, gradient_checkpointing=checkpointing)
        backend.unet.train()
        x = torch.randn(2, *backend.x0_shape, generator=torch.Generator().manual_seed(0))
        backend.denoise(x, torch.tensor([10, 900]), backend.encode_prompt([PROMPT])).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in backend.trainable_parameters()])
    assert backend.unet.is_gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_full_unet_unlearning_changes_only_the_unet(backend, tiny_sd_model, tmp_path):
    source = folder_digest(tiny_sd_model)
    before = unet_weights(backend)
    vae, text_encoder = ({k: v.clone() for k, v in m.state_dict().items()} for m in (backend.vae, backend.text_encoder))
    result = unlearn_prompt(backend, random_images(2, seed=10), random_images(6, seed=11), PROMPT, quick_config(),
                            knn_cache=None)
    assert len(result.events) == 2 and result.neighbours.shape == (2, 3)
    assert all(not torch.equal(before[k], v) for k, v in backend.unet.state_dict().items() if k.endswith("weight"))
    assert all(torch.equal(vae[k], v) for k, v in backend.vae.state_dict().items())
    assert all(torch.equal(text_encoder[k], v) for k, v in backend.text_encoder.state_dict().items())

    out = save_model(backend, tmp_path / "unlearned", result.metadata(prompt=PROMPT))
    assert folder_digest(tiny_sd_model) == source  # the source folder is never written
    saved = folder_digest(out)
    for name, digest in source.items():  # every file but the UNet's is copied byte for byte
        assert saved[name] == digest or name.startswith("unet/"), name
    assert saved["unet/diffusion_pytorch_model.safetensors"] != source["unet/diffusion_pytorch_model.safetensors"]
    assert not list(out.rglob("*.bin")) and json.loads((out / "retrack.json").read_text())["prompt"] == PROMPT

    reloaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    for k, v in reloaded.unet.state_dict().items():
        assert torch.equal(v, backend.unet.state_dict()[k])


# What StableDiffusionPipeline loads from a folder (use_safetensors, no variant): model_index.json
# and, per component, its config and plain safetensors weights; the tokenizer's files as they are.
LOADED_FILES = {"model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
                "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json", "text_encoder/model.safetensors",
                "safety_checker/config.json", "safety_checker/model.safetensors"}


def test_saving_a_full_download_writes_only_what_the_pipeline_loads(tiny_sd_download, tmp_path):
    """A real SD download holds the original weights several times over (single-file
    checkpoints at the top, .bin and .fp16 variants beside each component): none of it may
    reach the unlearned folder. It holds the loaded files only, the frozen ones byte-identical."""
    source = folder_digest(tiny_sd_download)
    backend = LatentBackend.from_pretrained(tiny_sd_download)
    assert backend.extra_components["safety_checker"] is not None  # loaded, so it must be saved too
    result = unlearn_prompt(backend, random_images(2, seed=40), random_images(4, seed=41), PROMPT,
                            quick_config(steps=1, grad_accum=1), knn_cache=None)
    out = save_model(backend, tmp_path / "unlearned", result.metadata(prompt=PROMPT))
    saved = folder_digest(out)

    tokenizer_files = {name for name in source if name.startswith("tokenizer/")}
    assert set(saved) == LOADED_FILES | tokenizer_files | {"retrack.json"}
    assert {"v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt", "unet/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/pytorch_model.bin"} <= set(source)
    for name, digest in saved.items():  # all but the trained UNet's weights: the source's bytes
        if name not in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json", "retrack.json"):
            assert digest == source[name], name
    assert saved["unet/diffusion_pytorch_model.safetensors"] != source["unet/diffusion_pytorch_model.safetensors"]
    assert folder_digest(tiny_sd_download) == source  # the source folder is never written

    reloaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(reloaded.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    for k, v in reloaded.unet.state_dict().items():
        assert torch.equal(v, backend.unet.state_dict()[k])


def test_the_pipeline_runs_every_network_on_the_backend_device(tiny_sd_download):
    """backend.to moves the safety checker (and image encoder) with the UNet, VAE and text
    encoder, so `pipeline()` has no module left behind on the CPU. PyTorch's 'meta' device
    stands in for a GPU here: no module reaches it unless it is moved."""
    pipe = LatentBackend.from_pretrained(tiny_sd_download).to("meta").pipeline()
    networks = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    assert {"unet", "vae", "text_encoder", "safety_checker"} <= set(networks)
    assert {name: next(m.parameters()).device.type for name, m in networks.items()} == dict.fromkeys(networks, "meta")


def test_a_k_larger_than_a_small_retain_set_is_refused_with_the_engine_rule(backend, monkeypatch):
    """The Stable Diffusion path follows the one K rule (no silent lowering), before encoding."""
    encoded = []
    monkeypatch.setattr(backend, "encode", lambda images, **kw: encoded.append(images) or LatentBackend.encode(backend, images))
    with pytest.raises(ValueError, match=r"K = 10 neighbours asked for, but the retain set has only 2 item\(s\)"):
        unlearn_prompt(backend, random_images(1, seed=20), random_images(2, seed=21), PROMPT,
                       quick_config(k=10, steps=1, grad_accum=1), knn_cache=None)
    assert encoded == []
    result = unlearn_prompt(backend, random_images(1, seed=20), random_images(2, seed=21), PROMPT,
                            quick_config(k=2, steps=1, grad_accum=1), knn_cache=None)
    assert result.config.k == 2 and result.neighbours.shape == (1, 2)


def test_lora_trains_only_the_adapter_and_loads_on_the_original_pipeline(tiny_sd_model, tmp_path):
    backend = LatentBackend.from_pretrained(tiny_sd_model, lora_rank=4)
    trainable = {n for n, p in backend.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {k: v.clone() for k, v in backend.unet.state_dict().items() if "lora_" not in k}
    result = unlearn_prompt(backend, random_images(2, seed=30), random_images(5, seed=31), PROMPT, quick_config(),
                            knn_cache=None)
    after = backend.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # base UNet weights untouched
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in backend.unet.named_parameters() if "lora_B" in n)

    out = save_model(backend, tmp_path / "adapter", result.metadata())
    assert sorted(p.name for p in out.iterdir()) == sorted([LORA_WEIGHTS_FILE, LORA_REFERENCE_FILE, "retrack.json"])
    assert all("lora" in k for k in load_file(out / LORA_WEIGHTS_FILE))
    reference = json.loads((out / LORA_REFERENCE_FILE).read_text())
    assert reference["base_model"] == str(tiny_sd_model) and reference["rank"] == 4

    # The adapter on the untouched original pipeline predicts what the trained backend predicts.
    x = torch.randn(2, *backend.x0_shape, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([100, 700]), backend.encode_prompt([PROMPT]).expand(2, -1, -1)
    with torch.no_grad():
        expected = backend.denoise(x, t, cond)
        original = StableDiffusionPipeline.from_pretrained(tiny_sd_model, local_files_only=True)
        plain = original.unet(x, t, encoder_hidden_states=cond).sample
        original.load_lora_weights(str(out))
        adapted = original.unet(x, t, encoder_hidden_states=cond).sample
        merged = load_backend(out).denoise(x, t, cond)  # base + adapter merged, through retrack
    assert not torch.allclose(plain, expected, atol=1e-6)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)


def test_models_that_do_not_predict_noise_are_refused(tiny_sd_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_model, local_files_only=True)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="epsilon"):
        LatentBackend(pipe)


def test_the_gpu_checks_gradient_comparison_at_tiny_size():
    """benchmarks/gpu_sd_check.py's comparison of one micro-batch's gradient in bf16 and fp16
    (with the gradient scaler) against fp32, run here on the CPU at tiny size: the scaled fp16
    gradient is finite and close to fp32's; bf16 (8 mantissa bits) is coarser but aligned."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sd_check.py"
    spec = importlib.util.spec_from_file_location("gpu_sd_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    rows = {row["precision"]: row for row in check.gradient_comparison(
        lambda: build_tiny_sd_pipeline(seed=0, image_size=32), "tiny", "cpu")}
    assert set(rows) == {"bf16", "fp16 + scaler", "fp16, no scaling"}
    scaled = rows["fp16 + scaler"]
    assert scaled["finite"] and scaled["relative L2 error"] < 1e-2 and scaled["cosine"] > 0.9999
    assert scaled["loss scale"] < 2.0**16 and scaled["attempts"] > 1  # it backed off from an overflow
    assert rows["bf16"]["relative L2 error"] < 0.1 and rows["bf16"]["cosine"] > 0.99


def test_models_load_in_parallel_threads(tiny_sd_model):
    """The app opens a model while a job or the scorer loads another. diffusers and transformers
    patch torch process-wide while they build a model; without retrack's loading lock every SD load
    here came back with meta parameters ("Cannot copy out of meta tensor")."""
    import threading

    from retrack.metrics import ClipScorer
    from retrack.paths import BUILTIN_MODEL

    errors = []

    def load_repeatedly(load, times):
        for _ in range(times):
            try:
                load()
            except Exception as exc:  # collected: an exception in a thread would not fail the test
                errors.append(repr(exc))

    loads = [(lambda: load_backend(tiny_sd_model), 3), (lambda: load_backend(BUILTIN_MODEL), 8),
             (lambda: ClipScorer.load("builtin"), 2)]
    threads = [threading.Thread(target=load_repeatedly, args=pair) for pair in loads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
