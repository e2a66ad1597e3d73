"""AdaRound weight rounding learned by BRECQ-style block reconstruction: the official SD recipe for DGQ's weights.

After the per-channel range search (`quantizers.weight_range_search`) each weight code may round down or up. AdaRound
(Nagel et al., 2020) learns that choice per weight: the code is `floor(w / s) + h(alpha) + z` with the rectified
sigmoid `h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1)`, `alpha` trained so that a block's output
matches the full-precision one, and a regularizer `sum(1 - |2h - 1|^beta)` pushes every `h` to 0 or 1; the final
code takes `alpha >= 0` as "up", so it is always the floor or the ceiling: within one code of nearest.

BRECQ (Li et al., 2021) reconstructs block by block, in the order the UNet runs them: each ResNet block and each
transformer block of the UNet is one unit, every other quantized layer (projections, up/down-sampling convolutions,
time embedding) a unit of its own. A unit's inputs come from the UNet whose upstream units are already quantized
(rounding learned), its targets from the full-precision UNet ("asym", as Q-Diffusion and the official code run it);
activations stay in full precision (weights only, as the official weight checkpoint is made).

The result is ordinary codes with the search's scales and zero points: the checkpoint format does not change.
`AdaRoundRecipe` holds the official recipe's numbers.

The official recipe runs for hours (20,000 steps for each of SD's units), so a reconstruction given a `resume_file`
writes its finished units' rounding there after every unit and, run again, goes on from the first unfinished one,
with the random state it had: the result is the uninterrupted run's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import DGQConfig
from .layers import QuantizedWeight
from .quantizers import pack_int4, qmax, quantize_uniform, weight_range_search
from .unet import quantizable_layers, set_module
from .unet_inputs import UNetInputs

# The rectified sigmoid's stretch (AdaRound): h reaches exactly 0 and 1 at finite alpha.
ZETA, GAMMA = 1.1, -0.1
# The units reconstructed as a whole; the official code's ResBlock and BasicTransformerBlock.
BLOCK_TYPES = (ResnetBlock2D, BasicTransformerBlock)
# Rows per UNet call while a unit's inputs or outputs are cached (no gradients: only memory bounds it).
CAPTURE_BATCH_ROWS = 64
# Full-precision targets of consecutive units are cached together, in one pass over the rows, up to this size (on
# the CPU): the bundled model's all fit, SD's take a few passes.
MAX_TARGET_BYTES = 4 << 30


@dataclass(frozen=True)
class AdaRoundRecipe:
    """The settings of AdaRound with block reconstruction; the defaults are the official SD recipe's (BRECQ /
    Q-Diffusion codebases: `quantize_weight.sh`, `quant/reconstruction.py`).

    Args:
        iters (`int`): Adam steps per unit (20,000).
        batch_size (`int`): rows per step, drawn at random from the cached ones (8).
        norm (`float`): p of the reconstruction loss `mean over rows of sum over dim 1 of |out - target|^p` (2.4).
        round_weight (`float`): weight of the rounding regularizer (0.01).
        beta_start (`float`), beta_end (`float`): the regularizer's exponent, annealed linearly from 20 to 2 ...
        warmup (`float`): ... after this fraction of the steps, during which the regularizer is off (0.2).
        lr (`float`): Adam's learning rate on alpha (1e-3).
        max_rows (`int`): cached rows per unit, drawn evenly at random from all calibration rows; 0: all (the recipe).
        seed (`int`): seed of the row draws.
    """

    iters: int = 20000
    batch_size: int = 8
    norm: float = 2.4
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr: float = 1e-3
    max_rows: int = 0
    seed: int = 0

    def beta(self, step: int) -> float:
        """The regularizer's exponent at `step`: `beta_start` through the warm-up, then linear down to `beta_end`."""
        start = self.warmup * self.iters
        if step < start:
            return self.beta_start
        progress = (step - start) / max(1.0, self.iters - start)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)

    def regularized(self, step: int) -> bool:
        """Whether the rounding regularizer counts at `step` (not during the warm-up)."""
        return step >= self.warmup * self.iters


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """AdaRound's soft rounding `h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1)`."""
    return (torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def initial_alpha(remainder: torch.Tensor) -> torch.Tensor:
    """The alpha whose `h(alpha)` equals `remainder` (`w / s - floor(w / s)`): soft rounding starts at the float weight."""
    return -torch.log((ZETA - GAMMA) / (remainder - GAMMA) - 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """`sum(1 - |2h - 1|^beta)`: zero when every `h` is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def lp_loss(output: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's reconstruction loss: `|output - target|^p` summed over dim 1 and averaged over the rest."""
    return (output - target).abs().pow(p).sum(1).mean()


class AdaRoundLayer(nn.Module):
    """A Linear or Conv2d whose weight is quantized per output channel, with rounding to nearest or learned.

    Wraps the float module during reconstruction; `quantized_weight()` gives the codes `dgq_core` stores.

    Args:
        module (`nn.Linear | nn.Conv2d`): the float layer (its weight and bias; left unchanged).
        bits (`int`): weight bits.
    """

    def __init__(self, module: nn.Linear | nn.Conv2d, bits: int) -> None:
        super().__init__()
        self.module, self.bits = module, bits
        weight = module.weight.detach().float()
        flat = weight.reshape(weight.shape[0], -1)
        scale, zero_point = weight_range_search(weight, bits)
        self.register_buffer("scale", scale[:, None])
        self.register_buffer("zero_point", zero_point[:, None])
        scaled = flat / self.scale
        self.register_buffer("floor", torch.floor(scaled))
        self.register_buffer("remainder", scaled - self.floor)
        self.register_buffer("nearest", quantize_uniform(flat, self.scale, self.zero_point, bits))
        self.alpha: nn.Parameter | None = None
        self.soft = False
        # This step's soft rounding `h(alpha)`, made once for the forward and the regularizer (`refresh`).
        self.h: torch.Tensor | None = None
        for parameter in module.parameters():
            parameter.requires_grad_(False)

    def start_learning(self) -> nn.Parameter:
        """Soft rounding from the float weight on: the parameter to train."""
        self.alpha = nn.Parameter(initial_alpha(self.remainder))
        self.soft = True
        self.refresh()
        return self.alpha

    def refresh(self) -> None:
        """Compute the soft rounding of the current `alpha`: once per training step, after the optimizer's."""
        self.h = rectified_sigmoid(self.alpha)

    def freeze(self) -> None:
        """Hard rounding from now on: up where `alpha >= 0`."""
        self.soft, self.h = False, None
        self.alpha.requires_grad_(False)

    def rounded_up(self) -> torch.Tensor:
        """The learned hard rounding (bool, (out, in)): which codes are the ceiling rather than the floor."""
        return self.alpha >= 0

    def restore(self, rounded_up: torch.Tensor) -> None:
        """Hard rounding as a finished reconstruction learned it (`rounded_up`), without training."""
        alpha = torch.where(rounded_up.to(self.floor.device), 1.0, -1.0)
        self.alpha = nn.Parameter(alpha, requires_grad=False)
        self.soft, self.h = False, None

    def codes(self) -> torch.Tensor:
        """The integer codes (float tensor, (out, in)): nearest, or floor plus the learned rounding."""
        if self.alpha is None:
            return self.nearest
        up = self.h if self.soft else (self.alpha >= 0).float()
        return (self.floor + up + self.zero_point).clamp(0, qmax(self.bits))

    def weight(self) -> torch.Tensor:
        return (self.scale * (self.codes() - self.zero_point)).reshape(self.module.weight.shape)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.h, beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight().to(x.dtype)
        if isinstance(self.module, nn.Linear):
            return F.linear(x, weight, self.module.bias)
        return self.module._conv_forward(x, weight, self.module.bias)

    def quantized_weight(self) -> QuantizedWeight:
        """The codes as `dgq_core` stores them (4-bit codes packed), with the search's scale and zero point."""
        quantized = QuantizedWeight(self.module.weight.shape, self.bits)
        codes = self.codes().detach().to(torch.uint8).cpu()
        quantized.codes = pack_int4(codes) if self.bits == 4 else codes
        quantized.scale = self.scale.flatten().cpu()
        quantized.zero_point = self.zero_point.flatten().cpu()
        return quantized


class _Stop(Exception):
    """Ends a UNet forward once the unit of interest has run."""


@dataclass
class _Cached:
    """A unit's inputs (positional and keyword) or outputs over the cached rows: tensors whose first dim is the
    rows; anything else as the first batch had it."""

    args: list
    kwargs: dict

    def take(self, index: torch.Tensor, device: torch.device) -> tuple[list, dict]:
        def pick(value):
            if isinstance(value, dict):
                return {key: pick(item) for key, item in value.items()}
            return value[index].to(device) if isinstance(value, torch.Tensor) and value.dim() else value

        return [pick(v) for v in self.args], {k: pick(v) for k, v in self.kwargs.items()}


def _join(batches: list[tuple[tuple, dict]], first_rows: int) -> _Cached:
    """One `_Cached` of the batches' captures; `first_rows`: rows of the first batch (what marks a row dim)."""

    def joined(values: list):
        first = values[0]
        if isinstance(first, dict):
            return {key: joined([value[key] for value in values]) for key in first}
        if isinstance(first, torch.Tensor) and first.dim() and first.shape[0] == first_rows:
            return torch.cat(values)
        return first

    args = [joined([batch[0][i] for batch in batches]) for i in range(len(batches[0][0]))]
    kwargs = {key: joined([batch[1][key] for batch in batches]) for key in batches[0][1]}
    return _Cached(args, kwargs)


def _detached(value):
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _run_rows(unet: nn.Module, inputs: UNetInputs, calls: torch.Tensor, rows: torch.Tensor, device) -> None:
    """Run `unet` over the chosen rows in batches; a hook ends each call with `_Stop` once it has what it needs."""
    for start in range(0, len(rows), CAPTURE_BATCH_ROWS):
        batch = slice(start, start + CAPTURE_BATCH_ROWS)
        try:
            unet(**inputs.unet_kwargs(calls[batch], rows[batch], device))
        except _Stop:
            continue
        raise RuntimeError("a reconstruction unit did not run in a UNet call")


@torch.no_grad()
def _capture_inputs(unet: nn.Module, unit: nn.Module, inputs: UNetInputs, calls, rows, device) -> _Cached:
    """A unit's inputs over the chosen rows, in `unet` as it is now (upstream units quantized)."""
    batches = []

    def pre_hook(module, args, kwargs):
        batches.append((tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}))
        raise _Stop

    handle = unit.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        _run_rows(unet, inputs, calls, rows, device)
    finally:
        handle.remove()
    return _join(batches, min(CAPTURE_BATCH_ROWS, len(rows)))


@torch.no_grad()
def _capture_outputs(unet: nn.Module, names: list[str], inputs: UNetInputs, calls, rows, device) -> dict[str, torch.Tensor]:
    """The outputs of the units `names` (in the order they run) over the chosen rows, in one pass."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(module, args, output, name):
        outputs[name].append(output.detach().cpu())
        if name == names[-1]:
            raise _Stop

    handles = [
        unet.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name in names
    ]
    try:
        _run_rows(unet, inputs, calls, rows, device)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(batches) for name, batches in outputs.items()}


def _target_groups(unet: nn.Module, names: list[str], run_one_row, rows: int) -> list[list[str]]:
    """Consecutive units whose full-precision outputs over `rows` rows fit `MAX_TARGET_BYTES` together: each group's
    targets are cached in one pass."""
    sizes: dict[str, int] = {}

    def hook(module, args, output, name):
        sizes[name] = output.numel() * output.element_size()

    handles = [
        unet.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name in names
    ]
    try:
        with torch.no_grad():
            run_one_row()
    finally:
        for handle in handles:
            handle.remove()
    groups, current, used = [], [], 0
    for name in names:
        size = sizes[name] * rows
        if current and used + size > MAX_TARGET_BYTES:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return [*groups, current] if current else groups


def reconstruction_units(unet: nn.Module, layers: dict[str, nn.Module], run_once) -> list[tuple[str, list[str]]]:
    """The units of BRECQ's reconstruction in the order a UNet call runs them: every `BLOCK_TYPES` module with the
    quantized layers in it, and every other quantized layer alone.

    Args:
        unet (`nn.Module`): the UNet.
        layers (`dict[str, nn.Module]`): its quantized layers by name.
        run_once: runs one UNet call (the order is observed, not assumed: diffusers registers a block's attentions
            before its resnets but runs each resnet first).

    Returns:
        `(unit name, names of its quantized layers)` per unit.
    """
    blocks = {name: module for name, module in unet.named_modules() if isinstance(module, BLOCK_TYPES)}
    units: dict[str, list[str]] = {name: [] for name in blocks}
    for name in layers:
        owner = next((block for block in blocks if name.startswith(block + ".")), None)
        units.setdefault(owner or name, []).append(name)
    order: list[str] = []

    def seen(name: str) -> None:
        if name not in order:
            order.append(name)

    handles = [
        unet.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: seen(name))
        for name, members in units.items() if members
    ]  # fmt: skip
    try:
        with torch.no_grad():
            run_once()
    finally:
        for handle in handles:
            handle.remove()
    return [(name, units[name]) for name in order]


@dataclass
class ReconstructionReport:
    """What reconstruction did.

    Args:
        units (`int`): units reconstructed. iters (`int`): steps per unit. rows (`int`): cached rows per unit.
        seconds (`float`): this run's wall time. train_seconds (`float`): time spent in training steps (the rest
            caches inputs and targets), in this run and the runs it resumed. loss_nearest (`dict[str, float]`),
            loss_learned (`dict[str, float]`): each unit's reconstruction loss on its cached rows with nearest and
            with learned rounding. resumed_units (`int`): units restored from the resume file, not trained.
    """

    units: int
    iters: int
    rows: int
    seconds: float
    loss_nearest: dict[str, float]
    loss_learned: dict[str, float]
    train_seconds: float = 0.0
    resumed_units: int = 0


@dataclass(frozen=True)
class _RunIdentity:
    """What a reconstruction's result depends on: `settings` (recipe, units, bits, shapes) must match exactly,
    `checksums` (per layer weight and per call input sums) within float tolerance, since a GPU may compute the
    calibration generations' inputs (or a merged LoRA) a rounding apart from one run to the next."""

    settings: str
    checksums: torch.Tensor

    @classmethod
    def of(
        cls, layers: dict[str, AdaRoundLayer], inputs: UNetInputs, recipe: AdaRoundRecipe, units: list[tuple[str, list[str]]]
    ) -> _RunIdentity:
        tensors = {"sample": inputs.sample, "encoder_hidden_states": inputs.encoder_hidden_states, **inputs.added_cond}
        shapes = {name: list(layer.module.weight.shape) + [layer.bits] for name, layer in layers.items()}
        settings = json.dumps([asdict(recipe), units, shapes, {k: list(v.shape) for k, v in tensors.items()}])
        sums = [layer.module.weight.detach().abs().sum(dtype=torch.float64) for layer in layers.values()]
        sums += [call.abs().sum(dtype=torch.float64) for value in tensors.values() for call in value.detach()]
        sums += list(inputs.timestep.detach().double())
        checksums = torch.stack([value.cpu() for value in sums])
        return cls(hashlib.sha256(settings.encode()).hexdigest(), checksums)

    def matches(self, settings: str, checksums: torch.Tensor) -> bool:
        return settings == self.settings and torch.allclose(checksums, self.checksums, rtol=1e-4, atol=1e-6)


class _ReconstructionProgress:
    """The resume file of one reconstruction: the hard rounding of every finished unit's layers, the row-draw
    generator's state and the report so far, in safetensors (JSON metadata), replaced atomically after each unit."""

    KEY = "dgq_adaround_progress"

    def __init__(self, path: str | Path, identity: _RunIdentity) -> None:
        self.path, self.identity = Path(path), identity

    def restore(self, layers: dict[str, AdaRoundLayer], report: ReconstructionReport, generator: torch.Generator) -> set[str]:
        """Restore the finished units (their layers' rounding, the report's entries, the generator): their names."""
        if not self.path.is_file():
            return set()
        with safe_open(str(self.path), framework="pt") as handle:
            state = json.loads((handle.metadata() or {}).get(self.KEY, "null"))
        tensors = load_file(str(self.path))
        if state is None or "checksums" not in tensors or not self.identity.matches(state.get("settings"), tensors["checksums"]):
            raise ValueError(
                f"{self.path} holds the progress of another reconstruction (other weights, calibration inputs, bits "
                "or recipe): delete it to start this one afresh"
            )
        for name in state["layers"]:
            layers[name].restore(tensors[name].bool())
        generator.set_state(tensors["generator_state"])
        report.loss_nearest.update(state["loss_nearest"])
        report.loss_learned.update(state["loss_learned"])
        report.train_seconds = state["train_seconds"]
        return set(state["loss_learned"])

    def save(self, layers: dict[str, AdaRoundLayer], report: ReconstructionReport, generator: torch.Generator) -> None:
        """Write the units finished so far (those with a learned loss in `report`)."""
        finished = [name for name, layer in layers.items() if layer.alpha is not None and not layer.soft]
        tensors = {name: layers[name].rounded_up().to(torch.uint8).cpu().contiguous() for name in finished}
        tensors["generator_state"] = generator.get_state()
        tensors["checksums"] = self.identity.checksums
        state = {
            "settings": self.identity.settings, "layers": finished, "loss_nearest": report.loss_nearest,
            "loss_learned": report.loss_learned, "train_seconds": report.train_seconds,
        }
        partial = self.path.with_name(self.path.name + ".partial")
        save_file(tensors, str(partial), metadata={self.KEY: json.dumps(state)})
        os.replace(partial, self.path)


def _unit_loss(unit: nn.Module, cached_in: _Cached, target: torch.Tensor, p: float, device) -> float:
    total, count = 0.0, target.shape[0]
    with torch.no_grad():
        for start in range(0, count, CAPTURE_BATCH_ROWS):
            index = torch.arange(start, min(start + CAPTURE_BATCH_ROWS, count))
            args, kwargs = cached_in.take(index, device)
            total += float(lp_loss(unit(*args, **kwargs), target[index].to(device), p)) * len(index)
    return total / count


def reconstruct_weights(
    unet: nn.Module,
    inputs: UNetInputs,
    config: DGQConfig,
    recipe: AdaRoundRecipe | None = None,
    progress: bool = True,
    resume_file: str | Path | None = None,
) -> tuple[dict[str, QuantizedWeight], ReconstructionReport]:
    """Learn the rounding of every quantized weight of a full-precision UNet by block reconstruction.

    Args:
        unet (`nn.Module`): the full-precision UNet (left unchanged), on the device to run on (CPU or CUDA).
        inputs (`UNetInputs`): the calibration generations' UNet inputs.
        config (`DGQConfig`): weight bits, excluded layers, `recon_iters`, `recon_samples`, seed.
        recipe (`AdaRoundRecipe | None`): the recipe; None: the official one with `config`'s iterations and rows.
        progress (`bool`): show a progress bar.
        resume_file (`str | Path | None`): where the finished units' rounding is saved after each unit; when the
            file exists, those units are restored from it instead of trained. It must have been written for this
            UNet's weights, these inputs, bits and recipe (`ValueError` otherwise). None: nothing saved.

    Returns:
        `(weights, report)`: a `QuantizedWeight` per quantized layer name (for `quantize_unet`), and what it did.
    """
    recipe = recipe or AdaRoundRecipe(iters=config.recon_iters, max_rows=config.recon_samples, seed=config.seed)
    started = time.perf_counter()
    device = next(unet.parameters()).device
    quantized = copy.deepcopy(unet).eval()
    wrapped = {
        name: AdaRoundLayer(module, config.w_bits)
        for name, module in quantizable_layers(quantized, config.excluded_layers).items()
    }
    for name, layer in wrapped.items():
        set_module(quantized, name, layer)

    total = inputs.calls * inputs.rows
    generator = torch.Generator().manual_seed(recipe.seed)
    chosen = torch.randperm(total, generator=generator)[: recipe.max_rows or total].sort().values
    calls, rows = chosen // inputs.rows, chosen % inputs.rows

    def run_first_row():
        quantized(**inputs.unet_kwargs(calls[:1], rows[:1], device))

    units = reconstruction_units(quantized, wrapped, run_first_row)
    report = ReconstructionReport(len(units), recipe.iters, len(chosen), 0.0, {}, {})
    saved = _ReconstructionProgress(resume_file, _RunIdentity.of(wrapped, inputs, recipe, units)) if resume_file else None
    done = saved.restore(wrapped, report, generator) if saved else set()
    todo = [(name, members) for name, members in units if name not in done]
    names = [name for name, _ in todo]
    groups = _target_groups(unet, names, lambda: unet(**inputs.unet_kwargs(calls[:1], rows[:1], device)), len(chosen))
    bar = tqdm(
        total=len(units) * recipe.iters, initial=len(done) * recipe.iters, desc="AdaRound reconstruction",
        unit="step", disable=not progress,
    )
    targets: dict[str, torch.Tensor] = {}
    try:
        for unit_name, members in todo:
            if unit_name not in targets:
                group = next(group for group in groups if unit_name in group)
                targets = _capture_outputs(unet, group, inputs, calls, rows, device)
            target = targets.pop(unit_name)
            unit = quantized.get_submodule(unit_name)
            cached_in = _capture_inputs(quantized, unit, inputs, calls, rows, device)
            report.loss_nearest[unit_name] = _unit_loss(unit, cached_in, target, recipe.norm, device)
            training = time.perf_counter()
            _learn_unit(unit, [wrapped[m] for m in members], cached_in, target, recipe, device, generator, bar)
            report.train_seconds += time.perf_counter() - training
            report.loss_learned[unit_name] = _unit_loss(unit, cached_in, target, recipe.norm, device)
            bar.set_postfix_str(f"{unit_name}: {report.loss_nearest[unit_name]:.3g} -> {report.loss_learned[unit_name]:.3g}")
            if saved:
                saved.save(wrapped, report, generator)
    finally:
        bar.close()
    report.resumed_units = len(done)
    report.seconds = time.perf_counter() - started
    return {name: layer.quantized_weight() for name, layer in wrapped.items()}, report


def _learn_unit(
    unit: nn.Module,
    layers: list[AdaRoundLayer],
    cached_in: _Cached,
    target: torch.Tensor,
    recipe: AdaRoundRecipe,
    device: torch.device,
    generator: torch.Generator,
    bar: tqdm | None = None,
) -> None:
    """Train the rounding of `layers` (the quantized layers of `unit`) on the cached rows, then freeze it."""
    # The fused step: one kernel per step for all of a unit's alphas, where the loop form runs a dozen elementwise ops
    # per layer (30 % of a ResNet block's step on the CPU).
    optimizer = torch.optim.Adam([layer.start_learning() for layer in layers], lr=recipe.lr, fused=True)
    count = target.shape[0]
    with torch.enable_grad():
        for step in range(recipe.iters):
            for layer in layers:
                layer.refresh()
            index = torch.randint(count, (min(recipe.batch_size, count),), generator=generator)
            args, kwargs = cached_in.take(index, device)
            loss = lp_loss(unit(*args, **kwargs), target[index].to(device), recipe.norm)
            if recipe.regularized(step):
                beta = recipe.beta(step)
                loss = loss + recipe.round_weight * sum(layer.rounding_loss(beta) for layer in layers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.update(1)
    for layer in layers:
        layer.freeze()



def save_reconstructed_weights(weights: dict[str, QuantizedWeight], path: str | Path) -> None:
    """Write reconstructed weights (codes, scales, zero points) to one safetensors file, so that one reconstruction
    serves later runs; shapes and bits go into its metadata.

    Args:
        weights (`dict[str, QuantizedWeight]`): from `reconstruct_weights`.
        path (`str | Path`): the file to write.
    """
    tensors, layout = {}, {}
    for name, weight in weights.items():
        for part in ("codes", "scale", "zero_point"):
            tensors[f"{name}.{part}"] = getattr(weight, part).contiguous()
        layout[name] = {"shape": list(weight.shape), "bits": weight.bits}
    save_file(tensors, str(path), metadata={"dgq_reconstructed_weights": json.dumps(layout)})


def load_reconstructed_weights(path: str | Path) -> dict[str, QuantizedWeight]:
    """Inverse of `save_reconstructed_weights` (safetensors: nothing is unpickled)."""
    with safe_open(str(path), framework="pt") as handle:
        layout = json.loads(handle.metadata()["dgq_reconstructed_weights"])
    tensors = load_file(str(path))
    weights = {}
    for name, info in layout.items():
        weight = QuantizedWeight(tuple(info["shape"]), info["bits"])
        weight.codes, weight.scale = tensors[f"{name}.codes"], tensors[f"{name}.scale"]
        weight.zero_point = tensors[f"{name}.zero_point"]
        weights[name] = weight
    return weights
