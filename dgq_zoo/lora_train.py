"""Train the example LoRA of the bundled model: the "outlined" style (a one-pixel ring around every shape), asked for
by a trigger word at the end of the prompt.

    dgq-train-zoo --lora --out dgq_zoo/loras --steps 800

The bundled full-precision model stays frozen; a rank-8 low-rank update `alpha / r * B A` is trained beside each
targeted Linear/Conv2d of its UNet. Half of the training images are the outlined renderings of scenes with the
trigger appended to their prompt, half the plain renderings of the same scenes with the plain prompt, so the model
without the trigger keeps drawing as before. The adapter is saved as diffusers/PEFT-format safetensors
(`unet.<module>.lora_A.weight` / `lora_B.weight`, PEFT's `lora_alpha` in the metadata as diffusers writes it) with a
JSON description beside it (trigger, base model, how it was trained). No pickle anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from dgq_zoo import shapes
from dgq_zoo.model import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS

BUNDLED_MODEL_DIR = Path(__file__).parent / "dgq-shapes"
LORA_DIR = Path(__file__).parent / "loras"
LORA_NAME = "outlined"
TRIGGER = "ink"
"""Three tokens of the bundled model's character-level vocabulary: the longest pair prompt with it is 19 of the text
encoder's 20 tokens ("outlined", eight tokens, would not fit after a pair's prompt)."""
TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")
"""Attention, transformer and ResNet layers: an outline is drawn by the convolutions, asked for through attention."""


def with_trigger(prompt: str) -> str:
    """The prompt that asks the example LoRA for its style."""
    return f"{prompt} {TRIGGER}"


@dataclass
class LoRATrainConfig:
    """How the example LoRA is trained (written into its JSON description).

    Args:
        steps: optimizer steps.
        batch_size: images per step.
        rank: the adapter's rank.
        alpha: its alpha (the update is scaled by alpha / rank).
        lr: AdamW learning rate (constant after a linear warm-up).
        warmup_steps: steps of the warm-up.
        pool_scenes: training scenes; each is rendered plain and outlined.
        uncond_prob: probability of the empty prompt (classifier-free guidance keeps working).
        min_snr_gamma: Min-SNR loss weighting, as the base model was trained.
        seed: seeds initialization, scenes, noise and timesteps.
    """

    steps: int = 800
    batch_size: int = 8
    rank: int = 8
    alpha: float = 8.0
    lr: float = 2e-3
    warmup_steps: int = 30
    pool_scenes: int = 2048
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0
    seed: int = 0


class LoRAModule(nn.Module):
    """The trainable low-rank update of one Linear or Conv2d, added to its output by a forward hook.

    Args:
        target (`nn.Module`): the frozen layer.
        rank (`int`), alpha (`float`): as in `LoRATrainConfig`.
    """

    def __init__(self, target: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.scale = alpha / rank
        if isinstance(target, nn.Conv2d):
            self.down = nn.Conv2d(target.in_channels, rank, target.kernel_size, target.stride, target.padding,
                                  target.dilation, bias=False)
            self.up = nn.Conv2d(rank, target.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(target.in_features, rank, bias=False)
            self.up = nn.Linear(rank, target.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity update, as PEFT's does

    def add_to(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.scale * self.up(self.down(args[0]))


def attach_lora(unet: nn.Module, rank: int, alpha: float) -> dict[str, LoRAModule]:
    """A trainable `LoRAModule` beside every targeted layer of `unet`, by module name."""
    adapters = {}
    for name, module in unet.named_modules():
        if name.endswith(TARGET_SUFFIXES) and isinstance(module, nn.Linear | nn.Conv2d):
            adapter = LoRAModule(module, rank, alpha)
            module.register_forward_hook(adapter.add_to)
            adapters[name] = adapter
    return adapters


def lora_state_dict(adapters: dict[str, LoRAModule]) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' PEFT layout."""
    tensors = {}
    for name, adapter in adapters.items():
        tensors[f"unet.{name}.lora_A.weight"] = adapter.down.weight.detach().contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = adapter.up.weight.detach().contiguous()
    return tensors


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def build_pool(
    pipe: StableDiffusionPipeline, config: LoRATrainConfig, encode_batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent means and stds of every training image (each scene plain, then outlined), the text-encoder states of
    its prompt (with the trigger for the outlined ones), and those of the empty prompt.

    Returns:
        `(means, stds, states, empty)`.
    """
    scenes = shapes.sample_scenes(config.pool_scenes, config.seed, "train")
    entries = [(scene, outlined) for outlined in (False, True) for scene in scenes]
    means, stds, states = [], [], []
    for start in tqdm(range(0, len(entries), encode_batch), desc="encode pool", dynamic_ncols=True):
        batch = entries[start : start + encode_batch]
        images = np.stack([
            np.asarray(shapes.render_scene(scene, shapes.placement_seed(config.seed, start + i), outlined=outlined))
            for i, (scene, outlined) in enumerate(batch)
        ])  # fmt: skip
        posterior = pipe.vae.encode(_images_to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        prompts = [with_trigger(scene.prompt) if outlined else scene.prompt for scene, outlined in batch]
        states.append(_encode_text(pipe, prompts))
    return torch.cat(means), torch.cat(stds), torch.cat(states), _encode_text(pipe, [""])[0]


def _encode_text(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return pipe.text_encoder(ids).last_hidden_state


def train_lora(
    model_dir: Path, out_dir: Path, config: LoRATrainConfig, name: str = LORA_NAME, threads: int | None = None
) -> Path:
    """Train the example LoRA on the full-precision model in `model_dir` and write `<out_dir>/<name>.safetensors`
    and `<name>.json`.

    Args:
        model_dir (`Path`): the bundled model's directory.
        out_dir (`Path`): where the adapter goes.
        config (`LoRATrainConfig`): how to train it.
        name (`str`): the adapter's name (its file name).
        threads (`int | None`): torch CPU threads (None: torch's default).

    Returns:
        `Path`: the safetensors file.
    """
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    torch.manual_seed(config.seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.requires_grad_(False).eval()
    means, stds, states, empty = build_pool(pipe, config)
    adapters = attach_lora(pipe.unet, config.rank, config.alpha)
    parameters = [p for adapter in adapters.values() for p in adapter.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                              beta_schedule="scaled_linear")
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(config.seed)
    scaling = pipe.vae.config.scaling_factor
    running = None
    with tqdm(total=config.steps, desc="lora", dynamic_ncols=True) as bar:
        for step in range(config.steps):
            index = torch.randint(0, len(means), (config.batch_size,), generator=generator)
            latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling
            hidden = states[index].clone()
            hidden[torch.rand(config.batch_size, generator=generator) < config.uncond_prob] = empty
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (config.batch_size,), generator=generator)
            prediction = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
            weight = torch.clamp(snr[timesteps], max=config.min_snr_gamma) / snr[timesteps]
            loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
    return save_lora(adapters, out_dir, name, config, model_dir, time.time() - started, running)


def save_lora(
    adapters: dict[str, LoRAModule], out_dir: Path, name: str, config: LoRATrainConfig, model_dir: Path,
    seconds: float, final_loss: float | None,
) -> Path:
    """Write the adapter (PEFT layout) and its JSON description; the safetensors file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_config = {"r": config.rank, "lora_alpha": config.alpha, "target_modules": sorted(set(TARGET_SUFFIXES))}
    path = out_dir / f"{name}.safetensors"
    save_file(lora_state_dict(adapters), path, metadata={"lora_adapter_metadata": json.dumps(peft_config)})
    description = {
        "name": name,
        "style": "outlined: a one-pixel ring around every shape, black (white or gray where the shape or the "
                 "background is black)",
        "trigger": TRIGGER,
        "usage": f"append the trigger to a prompt: \"{with_trigger('a small red circle on a gray background')}\"",
        "base_model": "dgq_zoo/dgq-shapes (full precision; applies to its DGQ checkpoint as a side branch)",
        "format": "diffusers/PEFT safetensors (unet.<module>.lora_A.weight / lora_B.weight)",
        "targets": sorted(adapters),
        "training": {**asdict(config), "seconds": round(seconds), "final_loss": final_loss,
                     "command": f"dgq-train-zoo --lora --out {out_dir} --steps {config.steps}",
                     "base": str(model_dir.name)},
    }
    path.with_suffix(".json").write_text(json.dumps(description, indent=1) + "\n")
    return path


def main(out_dir: Path, steps: int, seed: int, model_dir: Path | None, threads: int) -> int:
    """`dgq-train-zoo --lora`: train the example LoRA (see the module docstring).

    Args:
        out_dir (`Path`): where the adapter goes.
        steps (`int`): optimizer steps.
        seed (`int`): the run's seed.
        model_dir (`Path | None`): the base model (None: the bundled one).
        threads (`int`): torch CPU threads.
    """
    config = LoRATrainConfig(steps=steps, seed=seed)
    path = train_lora(model_dir or BUNDLED_MODEL_DIR, out_dir, config, threads=threads)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0
