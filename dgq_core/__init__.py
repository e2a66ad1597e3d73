"""DGQ: Distribution-aware Group Quantization for text-to-image diffusion UNets.

The public API; everything outside the library (`dgq` command, service, evaluation, benchmarks) uses these names:

    import dgq_core
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    dgq_core.quantize_(pipe, dgq_core.DGQConfig(w_bits=8, a_bits=8, groups=8), prompts=prompts)
    dgq_core.save_pretrained(pipe, "quantized/")
    pipe = dgq_core.from_pretrained("quantized/", device="cuda")        # or DiffusionPipeline.from_pretrained

Importing this package registers DGQ in diffusers' quantizer registry (`diffusers_quantizer`).
"""

from .attention import ScoresFootprint, scores_footprint, set_attention_budget
from .batch_invariance import make_batch_invariant
from .calibration import (
    CalibrationReport,
    UNetCalibration,
    collect_unet_stats,
    default_calibration_prompts,
    load_prompt_file,
    quantize_,
    sample_prompts,
)
from .checkpoint import CheckpointError, is_quantized_unet_dir, read_quant_config
from .conditioning import (
    EncodedPrompt,
    PromptConditioner,
    conditioning,
    pack_prompt_pair,
    text_conditioning,
    unpack_prompt_pair,
)
from .config import (
    ACTIVATION_BITS,
    ACTIVATION_METHODS,
    EXEC_MODES,
    PROB_QUANTIZERS,
    WEIGHT_BITS,
    CalibrationRecord,
    DGQConfig,
    QuantConfigError,
)
from .diffusers_quantizer import DGQQuantizer, register_dgq_quantizer
from .kernels import capture_cuda_graphs, int_execution_summary, release_cuda_graphs, set_exec_mode
from .lora import (
    LORA_NAME_PATTERN,
    AdapterSet,
    LoRA,
    LoRAError,
    LoRAInfo,
    LoRALibrary,
    UnknownLoRA,
    load_lora,
    lora_argument,
    lora_info,
    merge_lora,
    use_loras,
)
from .memory import peak_rss_bytes, reset_peak_rss, trim_heap
from .pipeline import (
    ResolvedModel,
    component_dtype,
    from_pretrained,
    quantize_pretrained,
    resolve_model,
    save_pretrained,
)
from .reconstruction import (
    AdaRoundRecipe,
    ReconstructionReport,
    load_reconstructed_weights,
    reconstruct_weights,
    save_reconstructed_weights,
)
from .schedulers import SAMPLERS, available_samplers, make_scheduler, sampler_name

__version__ = "0.1.0"

register_dgq_quantizer()

__all__ = [
    "ACTIVATION_BITS",
    "AdaRoundRecipe",
    "AdapterSet",
    "LORA_NAME_PATTERN",
    "LoRA",
    "LoRAError",
    "LoRAInfo",
    "LoRALibrary",
    "UnknownLoRA",
    "load_lora",
    "lora_argument",
    "lora_info",
    "merge_lora",
    "use_loras",
    "ACTIVATION_METHODS",
    "EXEC_MODES",
    "PROB_QUANTIZERS",
    "SAMPLERS",
    "WEIGHT_BITS",
    "CalibrationRecord",
    "CalibrationReport",
    "CheckpointError",
    "DGQConfig",
    "DGQQuantizer",
    "EncodedPrompt",
    "PromptConditioner",
    "ReconstructionReport",
    "QuantConfigError",
    "ResolvedModel",
    "ScoresFootprint",
    "UNetCalibration",
    "available_samplers",
    "capture_cuda_graphs",
    "collect_unet_stats",
    "component_dtype",
    "conditioning",
    "text_conditioning",
    "default_calibration_prompts",
    "from_pretrained",
    "int_execution_summary",
    "is_quantized_unet_dir",
    "load_prompt_file",
    "load_reconstructed_weights",
    "make_scheduler",
    "make_batch_invariant",
    "pack_prompt_pair",
    "peak_rss_bytes",
    "quantize_",
    "quantize_pretrained",
    "reset_peak_rss",
    "read_quant_config",
    "reconstruct_weights",
    "release_cuda_graphs",
    "resolve_model",
    "sampler_name",
    "sample_prompts",
    "scores_footprint",
    "save_pretrained",
    "save_reconstructed_weights",
    "set_attention_budget",
    "set_exec_mode",
    "trim_heap",
    "unpack_prompt_pair",
]
