"""LoRA adapters on a (DGQ-quantized or full-precision) UNet: loaded from safetensors, applied per batch row as a
full-precision low-rank side branch, or merged into a full-precision model.

    lora = load_lora("loras/outlined.safetensors")                      # diffusers/PEFT or kohya keys
    with use_loras(pipe.unet, [[(lora, 1.0)], [], [(lora, 0.5)]]):      # one adapter set per UNet batch row
        ...                                                              # row 1 runs the plain model
    merge_lora(fp_unet, lora, 1.0)                                       # W += scale * alpha / r * B @ A

Beside a quantized layer the branch adds `scale * alpha / r * B(A(x))` to `Q(W) Q(x)`: it reads the layer's input in
full precision, the quantized weights and activation parameters stay as calibrated on the base model, and nothing is
merged into the codes (what that costs against re-quantizing a merged model: BENCHMARKS.md). Each row of a batch
may have its own adapters and scales, so requests with different adapters share a batch; the branch's GEMMs are
padded like the quantized layers' (`batch_invariance`), so a row's result does not depend on its batch.

Only safetensors files are read: `.bin`/`.pt`/`.ckpt` adapters are pickles, refused with a message.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .batch_invariance import batch_stable_conv2d, row_stable_linear
from .kernels.graphs import cuda_graph_runner
from .layers import QuantConv2d, QuantizedLayer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LORA_SUFFIX = ".safetensors"
METADATA_SUFFIX = ".json"
"""An adapter's description beside its file (`outlined.json`: trigger words, how it was trained), optional."""

# Key layouts, each as (prefix of the layer name, suffix of the down weight, suffix of the up weight, suffix of alpha).
# diffusers/PEFT: "unet.<module>.lora_A.weight"; PEFT's own save: "base_model.model.<module>.lora_A.weight";
# diffusers' older attention-processor layout: "<attn>.processor.to_k_lora.down.weight" (rewritten below);
# kohya: "lora_unet_<module with _ for .>.lora_down.weight" with a scalar ".alpha".
_DOWN_UP = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".down.weight", ".up.weight"),
)
_UNET_PREFIXES = ("unet.", "base_model.model.", "lora_unet_")
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.")
_ATTN_PROCESSOR_LAYER = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
LORA_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What an adapter's name (its file name without the suffix) may be."""


class LoRAError(ValueError):
    """An adapter file that cannot be used: pickle, not a LoRA, or a LoRA for another model (the message says)."""


class UnknownLoRA(KeyError):
    """No adapter of that name in the library.

    Args:
        name (`str`): the name asked for.
        available (`list[str]`): the adapters the library has.
    """

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(name)
        self.name, self.available = name, available

    def __str__(self) -> str:
        return f"no LoRA adapter {self.name!r}; available: {', '.join(self.available) or 'none'}"


@dataclass
class LoRALayer:
    """The low-rank update of one Linear or Conv2d: `delta W = alpha / rank * up @ down`.

    Args:
        down (`torch.Tensor`): A, (rank, in) or, for a convolution, (rank, in, kh, kw).
        up (`torch.Tensor`): B, (out, rank) or (out, rank, 1, 1).
        alpha (`float`): the adapter's alpha (its rank when the file gives none, as diffusers reads it).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()

    def delta_weight(self, shape: torch.Size) -> torch.Tensor:
        """`alpha / rank * up @ down` in the shape of the target's weight."""
        return (self.scale * self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(shape)

    def branch(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`alpha / rank * B(A(x))` for `module`'s input `x`, each GEMM padded as the quantized layers' are."""
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        if isinstance(module, nn.Conv2d | QuantConv2d):
            down = down if down.dim() == 4 else down[:, :, None, None]
            hidden = batch_stable_conv2d(
                x, down, None, stride=module.stride, padding=module.padding, dilation=module.dilation
            )
            out = batch_stable_conv2d(hidden, up if up.dim() == 4 else up[:, :, None, None], None)
        else:
            out = row_stable_linear(row_stable_linear(x, down.flatten(1), None), up.flatten(1), None)
        return out * self.scale


@dataclass
class LoRA:
    """One adapter: its layers by target module name.

    Args:
        name (`str`): what requests call it (the file name without the suffix).
        layers (`dict[str, LoRALayer]`): by the UNet module they target, dotted (`down_blocks.0...attn2.to_k`), or
            with underscores for the dots as kohya writes them; `resolve_targets` matches either.
        key_format (`str`): "peft", "kohya" or "attn-procs" (diffusers' older layout).
        text_encoder_layers (`int`): layers for the text encoder in the file, which are not applied (the service's
            text encoder runs without adapters).
        description (`dict`): the adapter's JSON description (trigger words, training), if one lies beside it.
    """

    name: str
    layers: dict[str, LoRALayer]
    key_format: str
    text_encoder_layers: int = 0
    description: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


def flat_name(name: str) -> str:
    """A module name as kohya writes it: dots as underscores (unambiguous for diffusers' UNets)."""
    return name.replace(".", "_")


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoRAError(
            f"{path.name} is a pickle file ({path.suffix}), which can run code when loaded: it is refused. Convert "
            "it to safetensors (e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), out)) and use that"
        )
    if path.suffix.lower() != LORA_SUFFIX:
        raise LoRAError(f"{path.name}: a LoRA adapter must be a {LORA_SUFFIX} file")


def _split_key(key: str) -> tuple[str, str] | None:
    """(layer name, "down" | "up" | "alpha") of a LoRA key, the prefix kept; None for another tensor."""
    if key.endswith(".alpha"):
        return key.removesuffix(".alpha"), "alpha"
    for down, up in _DOWN_UP:
        if key.endswith(down):
            return key.removesuffix(down), "down"
        if key.endswith(up):
            return key.removesuffix(up), "up"
    return None


def _default_alphas(metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """PEFT's `lora_alpha` (and `alpha_pattern`) as diffusers writes them into the file's metadata, if it did."""
    raw = metadata.get("lora_adapter_metadata") or metadata.get("unet.lora_adapter_metadata")
    if not raw:
        return None, {}
    config = json.loads(raw)
    return config.get("lora_alpha"), dict(config.get("alpha_pattern") or {})


def parse_lora(name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoRA:
    """The adapter in a LoRA state dict of diffusers/PEFT, diffusers attention-processor or kohya keys.

    Args:
        name (`str`): the adapter's name.
        tensors (`dict[str, torch.Tensor]`): the file's tensors.
        metadata (`dict[str, str] | None`): the safetensors metadata (diffusers keeps PEFT's `lora_alpha` there).

    Raises:
        LoRAError: a key of no LoRA layout, a layer missing its up or down weight, or shapes that do not chain.
    """
    default_alpha, alpha_pattern = _default_alphas(metadata or {})
    parts: dict[str, dict[str, torch.Tensor]] = {}
    text_encoder, key_format = set(), "peft"
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            raise LoRAError(f"{name}: {key!r} is not a LoRA weight (lora_A/lora_B, lora_down/lora_up or alpha)")
        layer, part = split
        if layer.startswith(_TEXT_ENCODER_PREFIXES):
            text_encoder.add(layer)
            continue
        if layer.startswith("lora_unet_"):
            key_format = "kohya"
        elif _ATTN_PROCESSOR_LAYER.search(layer):
            key_format = "attn-procs"
            projection = _ATTN_PROCESSOR_LAYER.search(layer).group(1)
            layer = _ATTN_PROCESSOR_LAYER.sub("." + ("to_out.0" if projection == "to_out" else projection), layer)
        for prefix in _UNET_PREFIXES:
            layer = layer.removeprefix(prefix)
        parts.setdefault(layer, {})[part] = tensor
    layers = {}
    for layer, weights in parts.items():
        if "down" not in weights or "up" not in weights:
            raise LoRAError(f"{name}: layer {layer} has no {'down' if 'down' not in weights else 'up'} weight")
        down, up = weights["down"].float(), weights["up"].float()
        if up.flatten(1).shape[1] != down.shape[0]:
            raise LoRAError(f"{name}: layer {layer}: up {tuple(up.shape)} does not chain with down {tuple(down.shape)}")
        rank = down.shape[0]
        alpha = weights.get("alpha")
        if alpha is not None:
            alpha = float(alpha)
        else:
            leaf = layer.rsplit(".", 1)[-1]
            alpha = float(alpha_pattern.get(layer, alpha_pattern.get(leaf, default_alpha or rank)))
        layers[layer] = LoRALayer(down.contiguous(), up.contiguous(), alpha)
    if not layers:
        raise LoRAError(f"{name}: no UNet layer in the file (a text-encoder-only adapter is not supported)")
    return LoRA(name, layers, key_format, text_encoder_layers=len(text_encoder))


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn a file that is no safetensors (truncated, another format, unreadable) into a `LoRAError` naming it."""
    try:
        yield
    except (SafetensorError, OSError) as error:
        raise LoRAError(f"{path.name} cannot be read as safetensors: {error}") from error


def load_lora(path: str | Path, name: str | None = None, device: str | torch.device = "cpu") -> LoRA:
    """Read an adapter from a safetensors file (and its `.json` description beside it, if any).

    Args:
        path (`str | Path`): the `.safetensors` file.
        name (`str | None`): the adapter's name; None: the file name without the suffix.
        device (`str | torch.device`): where its weights go (the model's device).

    Raises:
        LoRAError: a pickle file, another format, or not a LoRA.
    """
    path = Path(path)
    _check_suffix(path)
    with _readable(path):
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path, device=str(device))
    lora = parse_lora(name or path.stem, tensors, metadata)
    description = path.with_suffix(METADATA_SUFFIX)
    if description.is_file():
        lora.description = json.loads(description.read_text())
    return lora


def lora_argument(text: str) -> tuple[Path, float]:
    """An adapter file and its scale from a command line's `PATH[:SCALE]` (scale 1 when left out)."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def resolve_targets(
    lora: LoRA, modules: dict[str, nn.Module], strict: bool = True
) -> dict[str, tuple[nn.Module, LoRALayer]]:
    """The modules an adapter's layers target, by module name.

    Args:
        lora (`LoRA`): the adapter.
        modules (`dict[str, nn.Module]`): candidate modules by name (`dict(unet.named_modules())`).
        strict (`bool`): every layer must find its module (False: a part of a UNet, e.g. only its cross-attention
            `to_k`/`to_v` in `PromptConditioner`).

    Raises:
        LoRAError: strict and some layers find no module, or a layer's shapes do not fit its module's.
    """
    by_flat_name = {flat_name(module_name): module_name for module_name in modules}
    found, missing = {}, []
    for layer_name, layer in lora.layers.items():
        module_name = by_flat_name.get(flat_name(layer_name))
        if module_name is None:
            missing.append(layer_name)
            continue
        module = modules[module_name]
        out_features, in_features = _layer_shape(module)
        if layer.up.shape[0] != out_features or layer.down.flatten(1).shape[1] not in _fan_ins(module, in_features):
            raise LoRAError(
                f"LoRA {lora.name}: layer {layer_name} is {layer.down.flatten(1).shape[1]}->{layer.up.shape[0]}, its "
                f"module {in_features}->{out_features}: an adapter for another model"
            )
        found[module_name] = (module, layer)
    if strict and missing:
        raise LoRAError(
            f"LoRA {lora.name}: {len(missing)} of its {len(lora.layers)} layers match no Linear/Conv2d of this model "
            f"(e.g. {missing[0]}): an adapter for another model"
        )
    return found


def _layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in channels) of a Linear, Conv2d or quantized one."""
    if isinstance(module, QuantizedLayer):
        return module.weight_q.shape[0], module.weight_q.shape[1]
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise LoRAError(f"a LoRA targets a {type(module).__name__}: only Linear and Conv2d layers take one")


def _fan_ins(module: nn.Module, in_features: int) -> set[int]:
    """The down weight's input sizes that fit a module: a conv's full kernel, or 1x1 (a pointwise LoRA)."""
    if isinstance(module, nn.Conv2d | QuantConv2d):
        kh, kw = module.kernel_size
        return {in_features * kh * kw} | ({in_features} if (kh, kw) == (1, 1) else set())
    return {in_features}


AdapterSet = list[tuple[LoRA, float]]
"""The adapters of one batch row with their scales (empty: the plain model)."""


@dataclass
class _Branch:
    """One adapter layer on a module for the rows that use it: `rows` None = every row, else their indices."""

    layer: LoRALayer
    rows: torch.Tensor | None
    scales: torch.Tensor


class _SideBranches:
    """The hooks of one module: the pre-hook keeps the call's input as the module receives it (before
    `make_batch_invariant` pads it), the forward hook adds every branch's rows to the output (after it is unpadded).

    Args:
        module_name (`str`): for the error of a call with another number of rows.
        rows (`int`): rows every call must have.
        branches (`list[_Branch]`): the adapter layers on this module.
    """

    def __init__(self, module_name: str, rows: int, branches: list[_Branch]) -> None:
        self.module_name, self.rows, self.branches = module_name, rows, branches
        self._inputs: list[torch.Tensor] = []  # the calls in flight

    def before(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x.shape[0] != self.rows:
            raise ValueError(f"LoRA adapters given for {self.rows} rows, but {self.module_name} runs {x.shape[0]}")
        self._inputs.append(x)

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = self._inputs.pop()
        for branch in self.branches:
            scales = branch.scales.to(device=x.device, dtype=x.dtype).view(-1, *[1] * (output.dim() - 1))
            if branch.rows is None:
                output = output + branch.layer.branch(module, x) * scales
            else:
                rows = branch.rows.to(x.device)
                output = output.index_add(0, rows, branch.layer.branch(module, x.index_select(0, rows)) * scales)
        return output


@contextlib.contextmanager
def use_loras(model: nn.Module | dict[str, nn.Module], rows: list[AdapterSet], strict: bool = True) -> Iterator[None]:
    """Run a model with each batch row's adapters as side branches beside the layers they target.

    Args:
        model (`nn.Module | dict[str, nn.Module]`): a UNet (quantized or not), or modules by UNet name (a part of
            one, with `strict=False`).
        rows (`list[AdapterSet]`): one adapter set per row of every call, in batch order (with classifier-free
            guidance diffusers stacks [negative rows..., prompt rows...]; `conditioning` orders them so).
        strict (`bool`): as for `resolve_targets`.

    Raises:
        LoRAError: an adapter does not fit the model.
        ValueError: the UNet runs CUDA graphs (`capture_cuda_graphs`); at a call, a targeted layer runs another
            number of rows than `rows` has.
    """
    if not any(rows):
        yield
        return
    if isinstance(model, nn.Module) and cuda_graph_runner(model) is not None:
        raise ValueError("this UNet replays CUDA graphs, which would skip the LoRA side branches: "
                         "release_cuda_graphs(unet) first")
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else model
    # module name -> adapter layer -> (layer, scale of each row that uses it)
    plan: dict[str, dict[int, tuple[LoRALayer, dict[int, float]]]] = {}
    for row, adapters in enumerate(rows):
        for lora, scale in adapters:
            for module_name, (_, layer) in resolve_targets(lora, modules, strict).items():
                _, row_scales = plan.setdefault(module_name, {}).setdefault(id(layer), (layer, {}))
                row_scales[row] = row_scales.get(row, 0.0) + scale
    handles = []
    try:
        for module_name, entries in plan.items():
            branches = []
            for layer, row_scales in entries.values():
                used = sorted(row_scales)
                row_ids = None if used == list(range(len(rows))) else torch.tensor(used)
                branches.append(_Branch(layer, row_ids, torch.tensor([row_scales[row] for row in used])))
            hooks, module = _SideBranches(module_name, len(rows), branches), modules[module_name]
            handles.append(module.register_forward_pre_hook(hooks.before, prepend=True))
            handles.append(module.register_forward_hook(hooks.after))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoRA, scale: float = 1.0) -> None:
    """Add an adapter into a full-precision model's weights: `W += scale * alpha / rank * up @ down`.

    Args:
        model (`nn.Module`): a full-precision UNet (a quantized one is refused: its codes are not changed).
        lora (`LoRA`): the adapter.
        scale (`float`): its strength.

    Raises:
        LoRAError: the adapter does not fit, or targets a quantized layer.
    """
    for module_name, (module, layer) in resolve_targets(lora, dict(model.named_modules())).items():
        if isinstance(module, QuantizedLayer):
            raise LoRAError(f"{module_name} is quantized: merge adapters into the full-precision model, then quantize")
        module.weight += scale * layer.delta_weight(module.weight.shape).to(module.weight.dtype)


@dataclass
class LoRAInfo:
    """What `GET /v1/loras` tells of an adapter, read from the file's header (no tensor loaded).

    Args:
        name (`str`): the adapter's name.
        rank (`int`): its largest rank.
        targets (`list[str]`): the UNet layers it targets.
        bytes (`int`): its tensors' size.
        description (`dict`): its JSON description, if any.
    """

    name: str
    rank: int
    targets: list[str]
    bytes: int
    description: dict = field(default_factory=dict)


def lora_info(path: str | Path) -> LoRAInfo:
    """An adapter's name, rank, targets and size from its file's header."""
    path = Path(path)
    _check_suffix(path)
    ranks, targets, size = [], set(), 0
    with _readable(path), safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            shape = tensor.get_shape()
            size += _dtype_bytes(tensor.get_dtype()) * (int(torch.Size(shape).numel()) if shape else 1)
            split = _split_key(key)
            if split and split[1] == "down" and not split[0].startswith(_TEXT_ENCODER_PREFIXES):
                ranks.append(shape[0])
                targets.add(split[0])
    description = path.with_suffix(METADATA_SUFFIX)
    return LoRAInfo(
        path.stem, max(ranks, default=0), sorted(targets), size,
        json.loads(description.read_text()) if description.is_file() else {},
    )


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)


class LoRALibrary:
    """The adapters of a directory (`<name>.safetensors`), loaded on first use and kept within a byte budget (LRU).

    Args:
        directory (`str | Path | None`): where the adapters lie; None: no adapters.
        cache_bytes (`int`): most bytes of adapters kept loaded; the least recently used go first (one adapter
            larger than the budget is still loaded for its batch).
        device (`str | torch.device`): where adapters are loaded (the model's device).
    """

    def __init__(self, directory: str | Path | None, cache_bytes: int, device: str | torch.device = "cpu") -> None:
        self.directory = Path(directory) if directory else None
        self.cache_bytes = cache_bytes
        self.device = device
        self._cache: OrderedDict[str, LoRA] = OrderedDict()
        self._lock = threading.Lock()

    def paths(self) -> dict[str, Path]:
        """Adapter name -> file, for every safetensors file of the directory with a valid name."""
        if self.directory is None or not self.directory.is_dir():
            return {}
        return {
            path.stem: path for path in sorted(self.directory.glob(f"*{LORA_SUFFIX}"))
            if LORA_NAME_PATTERN.match(path.stem)
        }

    def names(self) -> list[str]:
        return list(self.paths())

    def describe(self) -> list[LoRAInfo]:
        """`lora_info` of every adapter whose file header reads (a broken one is left out; naming it in a request
        tells what is wrong with it)."""
        described = []
        for path in self.paths().values():
            try:
                described.append(lora_info(path))
            except LoRAError:
                continue
        return described

    def check(self, names: list[str]) -> None:
        """Raise `UnknownLoRA` for the first of `names` the directory does not have."""
        available = self.paths()
        for name in names:
            if name not in available:
                raise UnknownLoRA(name, list(available))

    def get(self, name: str) -> LoRA:
        """The adapter `name`, loaded once and then kept while it fits the budget.

        Raises:
            UnknownLoRA: no such adapter.
            LoRAError: its file cannot be used.
        """
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        self.check([name])
        lora = load_lora(self.paths()[name], device=self.device)
        with self._lock:
            self._cache[name] = lora
            while len(self._cache) > 1 and self.cached_bytes > self.cache_bytes:
                self._cache.popitem(last=False)
        return lora

    @property
    def cached_bytes(self) -> int:
        return sum(lora.nbytes for lora in self._cache.values())

    def cached(self) -> list[str]:
        """Names of the adapters held now, least recently used first."""
        return list(self._cache)
