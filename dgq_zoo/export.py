"""Export a training checkpoint (EMA UNet and text encoder, VAE, optionally a fine-tuned decoder) as the bundled
model: a diffusers `save_pretrained` directory with safetensors weights, its provenance and calibration prompts.

    python -m dgq_zoo.export --run runs/zoo --decoder runs/decoder --out dgq_zoo/dgq-shapes
    python -m dgq_zoo.export --model dgq_zoo/dgq-shapes --decoder runs/decoder2 --out dgq_zoo/dgq-shapes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from dgq_zoo import shapes
from dgq_zoo.decoder import DECODER_FILE, load_vae_from_checkpoint
from dgq_zoo.decoder import STATE_FILE as DECODER_STATE_FILE
from dgq_zoo.model import ZooModelConfig, assemble_pipeline, build_text_encoder, build_unet
from dgq_zoo.tokenizer import write_bpe_files
from dgq_zoo.train import CHECKPOINT_DIR, STATE_FILE, checkpoint_unet_channels, write_calibration_prompts

PROVENANCE_FILE = "zoo_training.json"


def export(run_dir: Path, out_dir: Path, decoder_dir: Path | None = None) -> dict:
    """Write the pipeline of a run's latest checkpoint to `out_dir` (replaced) and return its provenance.

    Args:
        run_dir: the `--out` directory of `dgq_zoo.train`.
        out_dir: the exported model directory.
        decoder_dir: the `--out` directory of `dgq_zoo.decoder`, whose decoder replaces the run's.
    """
    checkpoint = run_dir / CHECKPOINT_DIR
    state = json.loads((checkpoint / STATE_FILE).read_text())
    weights = load_file(str(checkpoint / "model.safetensors"))
    config = ZooModelConfig(unet_channels=checkpoint_unet_channels(state))
    tokenizer = CLIPTokenizer.from_pretrained(run_dir / "tokenizer")
    text_encoder = build_text_encoder(tokenizer, config)
    unet = build_unet(config)
    for module, prefix in ((text_encoder, "ema_text_encoder."), (unet, "ema_unet.")):
        module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    provenance = {
        "vae_steps": state["vae_step"],
        "unet_steps": state["unet_step"],
        "train_config": state["train_config"],
        "decoder_finetune_steps": 0,
    }
    pipeline = assemble_pipeline(load_vae_from_checkpoint(checkpoint), text_encoder, tokenizer, unet)
    return _write(pipeline, provenance, out_dir, decoder_dir)


def export_with_decoder(model_dir: Path, out_dir: Path, decoder_dir: Path) -> dict:
    """An exported model with its decoder replaced by a later fine-tuning's (`dgq_zoo.decoder --model`).

    Args:
        model_dir: an exported model directory (the bundled model); `out_dir` may be the same directory.
        out_dir: the exported model directory (replaced).
        decoder_dir: the `--out` directory of `dgq_zoo.decoder`.
    """
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir)
    provenance = json.loads((model_dir / PROVENANCE_FILE).read_text())
    return _write(pipeline, provenance, out_dir, decoder_dir)


def _write(pipeline, provenance: dict, out_dir: Path, decoder_dir: Path | None) -> dict:
    if decoder_dir is not None:
        pipeline.vae.load_state_dict(load_file(str(decoder_dir / DECODER_FILE)), strict=False)
        decoder_state = json.loads((decoder_dir / DECODER_STATE_FILE).read_text())
        provenance["decoder_finetune_steps"] = decoder_state["step"]
        if "edge_weight" in decoder_state:
            provenance["decoder_edge_weight"] = decoder_state["edge_weight"]
    tmp = out_dir.with_name(out_dir.name + ".export")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
    write_bpe_files(shapes.vocabulary(), tmp / "tokenizer")
    write_calibration_prompts(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return provenance


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m dgq_zoo.export`."""
    parser = argparse.ArgumentParser(prog="python -m dgq_zoo.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="training run directory")
    source.add_argument("--model", type=Path, help="an exported model whose decoder --decoder replaces")
    parser.add_argument("--out", type=Path, required=True, help="exported model directory (replaced)")
    parser.add_argument("--decoder", type=Path, help="decoder fine-tuning directory")
    args = parser.parse_args(argv)
    if args.model is not None and args.decoder is None:
        parser.error("--model needs --decoder: it replaces the model's decoder")
    if args.model is not None:
        provenance = export_with_decoder(args.model, args.out, args.decoder)
    else:
        provenance = export(args.run, args.out, args.decoder)
    print(json.dumps(provenance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
