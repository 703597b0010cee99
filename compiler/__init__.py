"""The fx compiler core: tracing, ViT structure, passes, recipes, cost counting, rewrite helpers."""

from .attention_rewrite import (
    pin_attention_scale,
    scale_query_channels,
    scale_value_channels,
    slice_qk_heads,
    slice_value_heads,
)
from .errors import CompilerError, NotAViTError, PassError, RecipeError, TraceFailure
from .export import ExportConfig, ExportError, ExportResult, export_artifact, fold_for_export
from .flops import CostReport, attention_macs, count_costs, count_params
from .passes import (
    PASS_REGISTRY,
    GraphPass,
    IdentityPass,
    PassManager,
    PassRecord,
    PassResult,
    pass_from_record,
    register_pass,
)
from .recipe import Recipe, load_weights, replay, save_weights
from .rewrite import (
    SelectFeatures,
    insert_module_after,
    insert_module_before,
    replace_module,
    select_input_features,
    set_reshape_dims,
    slice_conv2d,
    slice_coupled,
    slice_linear,
    slice_norm,
    slice_parameter,
)
from .shapes import propagate_shapes, shape_of
from .structure import (
    AttentionStructure,
    BlockStructure,
    CoupledParam,
    MlpStructure,
    ViTStructure,
    find_vit_structure,
)
from .trace import example_input, input_shape_of, trace

__all__ = [
    "ExportConfig", "ExportError", "ExportResult", "export_artifact", "fold_for_export",
    "attention_macs",
    "AttentionStructure", "BlockStructure", "CompilerError", "CostReport", "CoupledParam", "GraphPass",
    "IdentityPass", "MlpStructure", "NotAViTError", "PASS_REGISTRY", "PassError", "PassManager",
    "PassRecord", "PassResult", "Recipe", "RecipeError", "TraceFailure", "ViTStructure", "count_costs",
    "count_params", "example_input", "find_vit_structure", "input_shape_of", "insert_module_after",
    "insert_module_before", "SelectFeatures", "select_input_features", "slice_value_heads",
    "pin_attention_scale", "scale_query_channels", "scale_value_channels", "slice_qk_heads",
    "load_weights", "pass_from_record", "propagate_shapes", "register_pass", "replace_module", "replay",
    "save_weights", "set_reshape_dims", "shape_of", "slice_conv2d", "slice_coupled", "slice_linear",
    "slice_norm", "slice_parameter", "trace",
]
