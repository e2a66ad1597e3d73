"""Train the bundled model on the shapes dataset: first the AutoencoderKL, then the UNet and text encoder jointly.

    python -m dgq_zoo.train --out runs/zoo --steps 6000 --seed 0
    python -m dgq_zoo.train --out runs/zoo --steps 9000 --seed 0 --resume   # continue the same run
    python -m dgq_zoo.train --lora --out dgq_zoo/loras --steps 800          # the example LoRA (dgq_zoo.lora_train)

Every batch is generated from (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
Checkpoints (weights, EMA weights, optimizer moments) are safetensors plus a JSON state file -- never pickle.
The EMA weights are exported as a diffusers `save_pretrained` directory every `--export-every` steps and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from dgq_zoo import lora_train, shapes
from dgq_zoo.model import (
    BETA_END,
    BETA_START,
    NUM_TRAIN_TIMESTEPS,
    ZooModelConfig,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from dgq_zoo.tokenizer import write_bpe_files

CHECKPOINT_DIR = "checkpoint"
# Read by `dgq quantize` when no --calib-prompts is given; training-split prompts, never held-out ones.
CALIBRATION_PROMPTS_FILE = "calibration_prompts.txt"
NUM_CALIBRATION_PROMPTS = 256
CALIBRATION_PROMPT_SEED = 31_337
STATE_FILE = "state.json"
LOG_FILE = "train_log.jsonl"
LATENT_POOL_FILE = "latent_pool.safetensors"
MIRROR_POOL_FILE = "mirror_pool.safetensors"


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (stored in the run's state file; a resume must not change them).

    Args:
        seed: seeds initialisation, batches, noise and timesteps.
        vae_steps: AutoencoderKL steps, run before the UNet stage.
        latent_pool_size: training images encoded once after the VAE stage; UNet batches are drawn from this pool,
            which spares the VAE encoder and the rendering on every step (the largest costs after the UNet).
        vae_batch_size: images per AutoencoderKL step.
        vae_lr: AutoencoderKL learning rate.
        vae_kl_weight: weight of the KL term against the per-pixel mean squared error. SD's VAE weighs the KL 1e-6
            against a reconstruction loss summed over pixels; 1e-8 against the mean is of that order here. Larger
            weights (1e-5 was tried) blur the reconstructions badly within the few steps trained here.
        batch_size: images per UNet step.
        lr: UNet + text-encoder learning rate after warm-up.
        warmup_steps: linear learning-rate warm-up of the UNet stage, counted from the optimizer's first step (a
            run warm-started with `--init-from` has a fresh optimizer, whose first steps would otherwise jolt
            the trained weights at the full rate).
        lr_decay_steps: cosine decay of the learning rate over this many steps after warm-up, down to
            `final_lr_fraction` of `lr`; 0 keeps it constant, so a run can stop at any step.
        final_lr_fraction: the learning rate at the end of the decay, as a fraction of `lr`.
        ema_decay: decay of the exported exponential moving average of the UNet and text-encoder weights.
        uncond_prob: probability of training on the empty prompt, so classifier-free guidance works.
        min_snr_gamma: Min-SNR loss weighting (Hang et al. 2023), which speeds up convergence.
        mirror_fraction: the fraction of each batch made of mirrored couples: a two-object image from the pool beside
            its mirror (the same words in the other order, the objects trading places; `shapes.mirrored`), for the
            pool images whose mirror is a training composition; the rest of the batch is drawn from the whole pool.
            Trained on independent draws the model learns the words of a pair but not their order, and draws the
            same image for "A above B" and "B above A"; the couples put that contrast into every batch.
        relation_loss_weight: weight of an auxiliary loss on the text encoder: a linear head (not exported) reads the
            relation of a two-object prompt off the second object's colour and shape tokens. A causal text encoder
            can only say where an object goes in the tokens after the relation word, and trained on the diffusion
            loss alone its tokens carried little of it. It was not enough by itself: the two-level UNet still drew
            the same image for "A above B" and "B above A" until it got a third resolution level (MODEL_CARD.md).
            0 turns it off.
    """

    seed: int = 0
    vae_steps: int = 1500
    latent_pool_size: int = 16384
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-8
    batch_size: int = 32
    lr: float = 4e-4
    warmup_steps: int = 200
    lr_decay_steps: int = 0
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0
    mirror_fraction: float = 0.0
    relation_loss_weight: float = 0.0


def checkpoint_unet_channels(state: dict) -> tuple[int, ...]:
    """The UNet block widths of a training checkpoint, from its state file's contents.

    Checkpoints written before the model config was recorded hold the two-level UNet of that time.
    """
    return tuple(state.get("model_config", {}).get("unet_channels", (64, 128)))


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _batch_seed(seed: int, stage: str, step: int) -> int:
    return seed * 10_000_000 + (0 if stage == "vae" else 5_000_000) + step


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and plain JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = float(value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Trainer:
    """Owns the models, optimizers and EMA copies of one run directory.

    Args:
        out_dir: the run directory (checkpoints, log, sample grids, exported pipeline).
        model_config: component sizes.
        train_config: hyper-parameters.
    """

    def __init__(self, out_dir: Path, model_config: ZooModelConfig, train_config: TrainConfig):
        self.out_dir = out_dir
        self.model_config = model_config
        self.config = train_config
        torch.manual_seed(train_config.seed)
        self.tokenizer = build_tokenizer(out_dir / "tokenizer", model_config)
        self.vae = build_vae(model_config)
        self.text_encoder = build_text_encoder(self.tokenizer, model_config)
        self.unet = build_unet(model_config)
        self.ema_text_encoder = build_text_encoder(self.tokenizer, model_config).requires_grad_(False)
        self.ema_unet = build_unet(model_config).requires_grad_(False)
        self.ema_text_encoder.load_state_dict(self.text_encoder.state_dict())
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.vae_optimizer = torch.optim.AdamW(
            self.vae.parameters(), lr=train_config.vae_lr, weight_decay=0.0
        )
        # Reads a pair's relation off its second object's tokens (the auxiliary loss); trained, never exported.
        self.relation_head = torch.nn.Linear(model_config.text_hidden_size, len(shapes.RELATIONS))
        self.optimizer = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()) + list(self.relation_head.parameters()),
            lr=train_config.lr,
            weight_decay=1e-2,
        )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            beta_start=BETA_START,
            beta_end=BETA_END,
            beta_schedule="scaled_linear",
        )
        alphas_cumprod = self.noise_scheduler.alphas_cumprod
        self.snr = alphas_cumprod / (1 - alphas_cumprod)
        self.vae_step = 0
        self.unet_step = 0
        # The UNet step at which the optimizer started (non-zero for a warm start); the schedule counts from it.
        self.schedule_origin = 0
        self.uncond_ids = self._tokenize([""])
        vocabulary = self.tokenizer.get_vocab()
        self.article_id = vocabulary["a</w>"]
        # The one word of each relation's phrase that no other relation has ("to the left of" -> "left").
        self.relation_ids = torch.tensor([vocabulary[f"{key}</w>"] for key in shapes.RELATIONS])
        self.latent_pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Mirror of each pool entry (means, stds, token ids, whether it has one), for `mirror_fraction`.
        self.mirror_pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "unet": self.unet,
            "ema_text_encoder": self.ema_text_encoder,
            "ema_unet": self.ema_unet,
            "relation_head": self.relation_head,
        }

    def save_checkpoint(self) -> None:
        directory = self.out_dir / CHECKPOINT_DIR
        directory.mkdir(parents=True, exist_ok=True)
        weights = {f"{name}.{k}": v for name, m in self._modules().items() for k, v in m.state_dict().items()}
        _save_atomic(weights, directory / "model.safetensors")
        meta = {}
        for name, optimizer in (("vae_optimizer", self.vae_optimizer), ("optimizer", self.optimizer)):
            tensors, meta[name] = _optimizer_tensors(optimizer)
            _save_atomic(tensors, directory / f"{name}.safetensors")
        state = {
            "vae_step": self.vae_step,
            "unet_step": self.unet_step,
            "schedule_origin": self.schedule_origin,
            "vae_scaling_factor": self.vae.config.scaling_factor,
            "train_config": asdict(self.config),
            "model_config": asdict(self.model_config),
            "optimizers": meta,
        }
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, directory / STATE_FILE)

    def load_checkpoint(self) -> None:
        directory = self.out_dir / CHECKPOINT_DIR
        state = json.loads((directory / STATE_FILE).read_text())
        if state["train_config"] != asdict(self.config):
            raise SystemExit(f"--resume with different hyper-parameters than {directory / STATE_FILE}")
        if checkpoint_unet_channels(state) != tuple(self.model_config.unet_channels):
            raise SystemExit(f"--resume with other --unet-channels than {directory / STATE_FILE}")
        weights = load_file(str(directory / "model.safetensors"))
        for name, module in self._modules().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
        for name, optimizer in (("vae_optimizer", self.vae_optimizer), ("optimizer", self.optimizer)):
            _load_optimizer(
                optimizer, load_file(str(directory / f"{name}.safetensors")), state["optimizers"][name]
            )
        self.vae_step = state["vae_step"]
        self.unet_step = state["unet_step"]
        self.schedule_origin = state.get("schedule_origin", 0)
        self.vae.register_to_config(scaling_factor=state["vae_scaling_factor"])

    def init_from_pipeline(self, model_dir: Path, with_unet: bool = True) -> None:
        """Warm-start from an exported pipeline (e.g. the committed one): its weights, a fresh optimizer.

        Args:
            model_dir: the exported pipeline.
            with_unet: also take its UNet and step count; False keeps this trainer's new UNet (another
                architecture, `ZooModelConfig.unet_channels`) and trains it from step 0 on the pipeline's VAE and
                text encoder.
        """
        self.vae.load_state_dict(AutoencoderKL.from_pretrained(model_dir, subfolder="vae").state_dict())
        self.vae.register_to_config(
            scaling_factor=AutoencoderKL.load_config(model_dir, subfolder="vae")["scaling_factor"]
        )
        text_state = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").state_dict()
        warm = [(self.text_encoder, text_state), (self.ema_text_encoder, text_state)]
        if with_unet:
            unet_state = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").state_dict()
            warm += [(self.unet, unet_state), (self.ema_unet, unet_state)]
        for module, state in warm:
            module.load_state_dict(state)
        provenance = json.loads((model_dir / "zoo_training.json").read_text())
        self.vae_step = provenance["vae_steps"]
        if with_unet:
            self.unet_step = provenance["unet_steps"]
            self.schedule_origin = self.unet_step

    # ---- training ----------------------------------------------------------------------------------------------

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def train_vae_step(self) -> float:
        images, _ = shapes.make_batch(
            self.config.vae_batch_size, _batch_seed(self.config.seed, "vae", self.vae_step), "train"
        )
        torch.manual_seed(_batch_seed(self.config.seed, "vae", self.vae_step))
        pixels = _images_to_tensor(images)
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + self.config.vae_kl_weight * posterior.kl().mean()
        self.vae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_optimizer.step()
        self.vae_step += 1
        return loss.item()

    @torch.no_grad()
    def calibrate_latent_scale(self, num_images: int = 512) -> float:
        """Set the VAE's scaling_factor to 1 / std of training latents, as SD's 0.18215 was chosen."""
        num_images = min(num_images, self.config.latent_pool_size)
        images, _ = shapes.make_batch(
            num_images, _batch_seed(self.config.seed, "vae", 9_999_999 - 5_000_000), "train"
        )
        latents = self.vae.encode(_images_to_tensor(images)).latent_dist.mean
        scaling_factor = float(1.0 / latents.std())
        self.vae.register_to_config(scaling_factor=scaling_factor)
        return scaling_factor

    @torch.no_grad()
    def build_latent_pool(self, encode_batch: int = 256) -> None:
        """Encode `latent_pool_size` training images once: posterior means, stds and token ids.

        The pool is a function of the seed and the (frozen after its stage) VAE, so it is cached in the run
        directory for resumed runs.
        """
        cache = self.out_dir / LATENT_POOL_FILE
        if cache.is_file():
            pool = load_file(str(cache))
            self.latent_pool = (pool["means"], pool["stds"], pool["input_ids"])
            return
        means, stds, input_ids = [], [], []
        for batch_seed, size in self._pool_batches(encode_batch, "latent pool"):
            images, scenes = shapes.make_batch(size, batch_seed, "train")
            posterior = self.vae.encode(_images_to_tensor(images)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            input_ids.append(self._tokenize([scene.prompt for scene in scenes]))
        self.latent_pool = (torch.cat(means), torch.cat(stds), torch.cat(input_ids))
        _save_atomic(dict(zip(("means", "stds", "input_ids"), self.latent_pool, strict=True)), cache)

    def _pool_batches(self, encode_batch: int, desc: str):
        """The latent pool's `shapes.make_batch` draws in pool order, as (batch seed, batch size), with a progress
        bar; the mirror pool walks the same ones."""
        pool_seed = _batch_seed(self.config.seed, "unet", 4_999_999)
        encode_batch = min(encode_batch, self.config.latent_pool_size)
        for start in tqdm(range(0, self.config.latent_pool_size, encode_batch), desc=desc):
            yield pool_seed * 1000 + start, encode_batch

    @torch.no_grad()
    def build_mirror_pool(self, encode_batch: int = 256) -> None:
        """Encode the mirror (`shapes.mirrored`) of every two-object latent-pool image whose mirrored composition is
        a training one, at the same placement, in the pool's order; cached in the run directory like the pool."""
        cache = self.out_dir / MIRROR_POOL_FILE
        if cache.is_file():
            pool = load_file(str(cache))
            self.mirror_pool = (pool["means"], pool["stds"], pool["input_ids"], pool["present"])
            return
        means, stds, input_ids, present = [], [], [], []
        latent_shape = self.latent_pool[0].shape[1:]
        for batch_seed, size in self._pool_batches(encode_batch, "mirror pool"):
            # The pool's scenes (shapes.make_batch's draw), each mirrored at its own placement.
            mirrors = [shapes.mirrored(scene) for scene in shapes.sample_scenes(size, batch_seed, "train")]
            keep = [m is not None and not shapes.is_heldout(m) for m in mirrors]
            batch_means = torch.zeros(size, *latent_shape)
            batch_stds = torch.ones(size, *latent_shape)
            kept = [i for i, k in enumerate(keep) if k]
            if kept:
                images = np.stack(
                    [np.asarray(shapes.render_scene(mirrors[i], shapes.placement_seed(batch_seed, i))) for i in kept]
                )
                posterior = self.vae.encode(_images_to_tensor(images)).latent_dist
                batch_means[kept], batch_stds[kept] = posterior.mean, posterior.std
            means.append(batch_means)
            stds.append(batch_stds)
            input_ids.append(self._tokenize([m.prompt if k else "" for m, k in zip(mirrors, keep, strict=True)]))
            present.append(torch.tensor(keep))
        self.mirror_pool = (torch.cat(means), torch.cat(stds), torch.cat(input_ids), torch.cat(present))
        names = ("means", "stds", "input_ids", "present")
        _save_atomic(dict(zip(names, self.mirror_pool, strict=True)), cache)

    def _batch_entries(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior means, stds and token ids of one batch (see `TrainConfig.mirror_fraction`)."""
        means, stds, pool_ids = self.latent_pool
        couples = round(self.config.mirror_fraction * self.config.batch_size / 2)
        if couples == 0:
            index = torch.randint(0, len(means), (self.config.batch_size,), generator=generator)
            return means[index], stds[index], pool_ids[index]
        if self.mirror_pool is None:
            self.build_mirror_pool()
        mirror_means, mirror_stds, mirror_ids, present = self.mirror_pool
        mirrorable = torch.nonzero(present).flatten()
        paired = mirrorable[torch.randint(0, len(mirrorable), (couples,), generator=generator)]
        others = torch.randint(0, len(means), (self.config.batch_size - 2 * couples,), generator=generator)
        index = torch.cat((paired, others))
        return (
            torch.cat((means[index], mirror_means[paired])),
            torch.cat((stds[index], mirror_stds[paired])),
            torch.cat((pool_ids[index], mirror_ids[paired])),
        )

    def train_unet_step(self) -> float:
        if self.latent_pool is None:
            self.build_latent_pool()
        step_seed = _batch_seed(self.config.seed, "unet", self.unet_step)
        generator = torch.Generator().manual_seed(step_seed)
        batch_means, batch_stds, batch_ids = self._batch_entries(generator)
        latent_noise = torch.randn(batch_means.shape, generator=generator)
        latents = (batch_means + batch_stds * latent_noise) * self.vae.config.scaling_factor
        input_ids = batch_ids.clone()
        drop = torch.rand(len(input_ids), generator=generator) < self.config.uncond_prob
        input_ids[drop] = self.uncond_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(input_ids),), generator=generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        hidden_states = self.text_encoder(input_ids).last_hidden_state
        prediction = self.unet(noisy, timesteps, hidden_states).sample
        snr = self.snr[timesteps]
        weight = torch.clamp(snr, max=self.config.min_snr_gamma) / snr
        loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        if self.config.relation_loss_weight > 0:
            loss = loss + self.config.relation_loss_weight * self.relation_loss(input_ids, hidden_states)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()), 1.0
        )
        self.optimizer.step()
        self._update_ema()
        self.unet_step += 1
        return loss.item()

    def second_objects(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the second object of each two-object prompt starts, and the prompt's relation.

        Returns:
            `(pairs, colour_positions, relations)`: a (B,) mask of the two-object prompts; for each of them, the token
            index of the second object's colour word (its shape word follows) and the index into `shapes.RELATIONS`.
        """
        relation = (input_ids[:, :, None] == self.relation_ids).any(dim=1)
        pairs = relation.any(dim=1)
        articles = input_ids[pairs] == self.article_id
        # The second "a" of a pair prompt opens its second object; the tokenizer makes one token per word.
        second_article = ((articles.cumsum(dim=1) == 2) & articles).int().argmax(dim=1)
        return pairs, second_article + 1, relation[pairs].int().argmax(dim=1)

    def relation_loss(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the relation of each two-object prompt, read by `relation_head` off the text encoder's
        states of the second object's colour and shape tokens ("a red circle above a *blue square* on ...")."""
        pairs, colours, relations = self.second_objects(input_ids)
        if not pairs.any():
            return hidden_states.new_zeros(())
        states, rows = hidden_states[pairs], torch.arange(len(colours))
        tokens = torch.cat((states[rows, colours], states[rows, colours + 1]))
        return F.cross_entropy(self.relation_head(tokens), relations.repeat(2))

    def learning_rate(self) -> float:
        """The UNet-stage learning rate of the current step: linear warm-up, then constant or cosine decay."""
        config = self.config
        step = self.unet_step - self.schedule_origin
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        if config.lr_decay_steps <= 0:
            return config.lr
        progress = min(1.0, (step - config.warmup_steps) / config.lr_decay_steps)
        fraction = config.final_lr_fraction + (1 - config.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        return config.lr * fraction

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Bias-corrected early on, so the EMA is usable after a few hundred steps.
        decay = min(self.config.ema_decay, (1 + self.unet_step) / (10 + self.unet_step))
        for ema, live in ((self.ema_unet, self.unet), (self.ema_text_encoder, self.text_encoder)):
            for ema_param, param in zip(ema.parameters(), live.parameters(), strict=True):
                ema_param.lerp_(param, 1 - decay)

    # ---- export ------------------------------------------------------------------------------------------------

    def pipeline(self) -> StableDiffusionPipeline:
        """The EMA weights as a StableDiffusionPipeline."""
        pipeline = assemble_pipeline(self.vae, self.ema_text_encoder, self.tokenizer, self.ema_unet)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def export(self, directory: Path, wall_seconds: float) -> None:
        """save_pretrained of the EMA pipeline plus a provenance file (steps, seed, sizes, command)."""
        tmp = directory.with_name(directory.name + ".tmp")
        self.pipeline().save_pretrained(tmp, safe_serialization=True)
        provenance = {
            "vae_steps": self.vae_step,
            "unet_steps": self.unet_step,
            "train_config": asdict(self.config),
            "model_config": asdict(self.model_config),
            "train_wall_seconds_this_process": round(wall_seconds, 1),
            "command": "python -m dgq_zoo.train " + " ".join(sys.argv[1:]),
        }
        (tmp / "zoo_training.json").write_text(json.dumps(provenance, indent=1) + "\n")
        write_bpe_files(shapes.vocabulary(), tmp / "tokenizer")
        write_calibration_prompts(tmp)
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            _remove_tree(old)
        else:
            os.replace(tmp, directory)

    @torch.no_grad()
    def sample_grid(self, path: Path, num_prompts: int = 16, num_inference_steps: int = 20) -> None:
        """A grid of held-out prompts (real image left, generated right) to watch training."""
        scenes = shapes.sample_scenes(num_prompts, seed=1234, split="heldout")
        result = self.pipeline()(
            [s.prompt for s in scenes],
            height=self.model_config.image_size,
            width=self.model_config.image_size,
            num_inference_steps=num_inference_steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        generated = (result.images * 255).round().astype(np.uint8)
        real = np.stack([np.asarray(shapes.render_scene(s, seed=i)) for i, s in enumerate(scenes)])
        pairs = np.concatenate([real, generated], axis=2)
        rows = [np.concatenate(list(pairs[i : i + 4]), axis=1) for i in range(0, num_prompts, 4)]
        Image.fromarray(np.concatenate(rows, axis=0)).resize(
            (rows[0].shape[1] * 4, len(rows) * 32 * 4), Image.NEAREST
        ).save(path)


def write_calibration_prompts(model_dir: Path) -> None:
    """Write the model's calibration prompt file (training-split compositions, fixed seed)."""
    scenes = shapes.sample_scenes(NUM_CALIBRATION_PROMPTS, CALIBRATION_PROMPT_SEED, split="train")
    (model_dir / CALIBRATION_PROMPTS_FILE).write_text("".join(scene.prompt + "\n" for scene in scenes))


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def _log(out_dir: Path, record: dict) -> None:
    with open(out_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(width) for width in text.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dgq-train-zoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory (checkpoints, log, sample grids)"
    )
    parser.add_argument(
        "--steps", type=int, required=True, help="total UNet steps (the VAE stage comes first)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--lr-decay-steps", type=int, default=TrainConfig.lr_decay_steps)
    parser.add_argument(
        "--mirror-fraction", type=float, default=TrainConfig.mirror_fraction,
        help="fraction of each batch made of two-object images beside their mirrors (same words, other order)",
    )  # fmt: skip
    parser.add_argument(
        "--relation-loss-weight", type=float, default=TrainConfig.relation_loss_weight,
        help="weight of the auxiliary loss that reads a pair's relation off its second object's text tokens",
    )  # fmt: skip
    parser.add_argument("--final-lr-fraction", type=float, default=TrainConfig.final_lr_fraction)
    parser.add_argument("--latent-pool-size", type=int, default=TrainConfig.latent_pool_size)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument(
        "--init-from", type=Path, help="warm-start from an exported pipeline dir (fresh optimizer)"
    )
    parser.add_argument(
        "--fresh-unet", action="store_true",
        help="with --init-from: take only its VAE and text encoder, train a new UNet from step 0",
    )  # fmt: skip
    parser.add_argument(
        "--unet-channels", type=_channels, default=ZooModelConfig.unet_channels,
        help="UNet block widths, comma-separated; one resolution level each (default: the bundled model's)",
    )  # fmt: skip
    parser.add_argument(
        "--export", type=Path, help="where to save_pretrained the EMA pipeline (default OUT/pipeline)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--export-every", type=int, default=500)
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--lora", action="store_true",
        help="train the example LoRA (the outlined style) on the full-precision model of --init-from (default: the "
        "bundled one) instead; uses --out, --steps, --seed and --threads (dgq_zoo/lora_train.py)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m dgq_zoo.train` / `dgq-train-zoo`.

    Args:
        argv: command-line arguments (sys.argv[1:] when None).

    Returns:
        process exit status.
    """
    args = parse_args(argv)
    if args.lora:
        return lora_train.main(args.out, args.steps, args.seed, args.init_from, args.threads)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    export_dir = args.export or args.out / "pipeline"
    train_config = TrainConfig(
        seed=args.seed,
        vae_steps=args.vae_steps,
        latent_pool_size=args.latent_pool_size,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay_steps=args.lr_decay_steps,
        final_lr_fraction=args.final_lr_fraction,
        mirror_fraction=args.mirror_fraction,
        relation_loss_weight=args.relation_loss_weight,
    )
    if args.fresh_unet and not args.init_from:
        raise SystemExit("--fresh-unet needs --init-from (the pipeline whose VAE and text encoder to keep)")
    trainer = Trainer(args.out, ZooModelConfig(unet_channels=args.unet_channels), train_config)
    if args.resume:
        trainer.load_checkpoint()
    elif args.init_from:
        trainer.init_from_pipeline(args.init_from, with_unet=not args.fresh_unet)
    start = time.time()

    if trainer.vae_step < train_config.vae_steps:
        with tqdm(
            total=train_config.vae_steps, initial=trainer.vae_step, desc="vae", dynamic_ncols=True
        ) as bar:
            while trainer.vae_step < train_config.vae_steps:
                loss = trainer.train_vae_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if trainer.vae_step % 50 == 0:
                    _log(
                        args.out,
                        {"stage": "vae", "step": trainer.vae_step, "loss": loss, "time": time.time()},
                    )
                if trainer.vae_step % args.checkpoint_every == 0:
                    trainer.save_checkpoint()
        scale = trainer.calibrate_latent_scale()
        _log(args.out, {"stage": "vae", "step": trainer.vae_step, "scaling_factor": scale})
        trainer.save_checkpoint()

    running = None
    with tqdm(total=args.steps, initial=trainer.unet_step, desc="unet", dynamic_ncols=True) as bar:
        while trainer.unet_step < args.steps:
            loss = trainer.train_unet_step()
            running = loss if running is None else 0.98 * running + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            step = trainer.unet_step
            if step % 50 == 0:
                _log(args.out, {"stage": "unet", "step": step, "loss": running, "time": time.time()})
            if step % args.checkpoint_every == 0:
                trainer.save_checkpoint()
            if step % args.export_every == 0:
                trainer.export(export_dir, time.time() - start)
            if step % args.sample_every == 0:
                trainer.sample_grid(args.out / f"samples_{step:06d}.png")
    trainer.save_checkpoint()
    trainer.export(export_dir, time.time() - start)
    if math.isfinite(running or 0.0):
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
