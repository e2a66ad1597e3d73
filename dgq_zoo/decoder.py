"""Fine-tune the AutoencoderKL decoder alone, with the encoder frozen, as SD's "ft-MSE" VAE was made.

The UNet is trained on the encoder's latents, so the decoder can keep improving -- in its own process, beside the
UNet run, or after it -- without invalidating the UNet. The short joint VAE stage of `dgq_zoo.train` leaves
reconstructions blurry on two CPU cores; this stage sharpens them.

    python -m dgq_zoo.decoder --checkpoint runs/zoo/checkpoint --out runs/decoder --steps 3000 [--resume]
    python -m dgq_zoo.decoder --model dgq_zoo/dgq-shapes --out runs/decoder2 --steps 3000   # continue
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dgq_zoo import shapes
from dgq_zoo.model import ZooModelConfig, build_vae

DECODER_FILE = "decoder.safetensors"
STATE_FILE = "decoder_state.json"
# The parts of AutoencoderKL that map latents to pixels.
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def load_vae_from_checkpoint(checkpoint_dir: Path):
    """The AutoencoderKL of a `dgq_zoo.train` checkpoint, with its scaling factor."""
    weights = load_file(str(checkpoint_dir / "model.safetensors"))
    state = json.loads((checkpoint_dir / "state.json").read_text())
    vae = build_vae(ZooModelConfig())
    vae.load_state_dict({k[len("vae.") :]: v for k, v in weights.items() if k.startswith("vae.")})
    vae.register_to_config(scaling_factor=state["vae_scaling_factor"])
    return vae


def load_vae(checkpoint_dir: Path | None, model_dir: Path | None) -> AutoencoderKL:
    """The AutoencoderKL to fine-tune: from a training checkpoint, or from an exported pipeline directory."""
    if checkpoint_dir is not None:
        return load_vae_from_checkpoint(checkpoint_dir)
    return AutoencoderKL.from_pretrained(model_dir, subfolder="vae")


def edge_weights(pixels: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Per-pixel loss weights `1 + edge_weight` on and next to colour edges of the target images, else 1.

    The objects of two-object scenes are about 11 px wide; blur rounds their corners into circles, and a loss
    averaged over the mostly flat background barely notices. Weighting the pixels around edges spends the
    decoder's capacity where shapes are decided.
    """
    spread = F.max_pool2d(pixels, 3, 1, 1) + F.max_pool2d(-pixels, 3, 1, 1)
    edges = (spread.abs().amax(dim=1, keepdim=True) > 1e-3).float()
    return 1.0 + edge_weight * edges


def decoder_state(vae) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(DECODER_PREFIXES)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m dgq_zoo.decoder`.

    Args:
        argv: command-line arguments (sys.argv[1:] when None).

    Returns:
        process exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m dgq_zoo.decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint dir of the UNet run")
    source.add_argument("--model", type=Path, help="an exported pipeline dir whose decoder to keep training")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--edge-weight", type=float, default=0.0, help="extra loss weight of pixels at colour edges (see edge_weights)"
    )
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    vae = load_vae(args.checkpoint, args.model)
    vae.requires_grad_(False)
    decoder_params = [p for name, p in vae.named_parameters() if name.startswith(DECODER_PREFIXES)]
    for param in decoder_params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder_params, lr=args.lr, weight_decay=0.0)
    # Steps count the decoder's whole fine-tuning, so a continued one draws new batches and the export says how
    # far it got.
    step = 0
    if args.model is not None:
        step = json.loads((args.model / "zoo_training.json").read_text()).get("decoder_finetune_steps", 0)
    if args.resume and (args.out / STATE_FILE).is_file():
        vae.load_state_dict(load_file(str(args.out / DECODER_FILE)), strict=False)
        step = json.loads((args.out / STATE_FILE).read_text())["step"]

    def save() -> None:
        tmp = args.out / (DECODER_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in decoder_state(vae).items()}, str(tmp))
        os.replace(tmp, args.out / DECODER_FILE)
        (args.out / STATE_FILE).write_text(
            json.dumps({"step": step, "source": str(args.checkpoint or args.model), "edge_weight": args.edge_weight})
            + "\n"
        )

    with tqdm(total=args.steps, initial=step, desc="decoder") as bar:
        while step < args.steps:
            batch_seed = args.seed * 10_000_000 + 8_000_000 + step
            images, _ = shapes.make_batch(args.batch_size, batch_seed, "train")
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(batch_seed))
            reconstruction = vae.decode(latents).sample
            # L1 keeps edges sharp where the mean squared error alone settles for blur.
            error = reconstruction - pixels
            weights = edge_weights(pixels, args.edge_weight)
            loss = (weights * (error.square() + error.abs())).mean() / weights.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.save_every == 0:
                save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
