"""Our vLLM model for the LLaVA architecture (CLIP tower + 2-layer projector + Llama), with
SMoLoRA routed adapters beside the projector linears and each decoder MLP's fused linears.

What it does:
- builds vLLM's `CLIPVisionModel` (up to LLaVA's feature layer), a projector from vLLM's
  parallel linears, and vLLM's `LlamaForCausalLM`, whose MLPs it swaps for `RoutedLlamaMLP`
  (same `gate_up_proj` / `down_proj` modules, so weights load under vLLM's usual names);
- loads a standard HF LLaVA folder (transformers 4 or 5 key layouts);
- in `forward`, lays out the step's tokens by request (`RowRoutingState.text_step`) and
  scopes it for the routed layers; in `embed_multimodal`, does the same for image patches
  using the `smolora_key` field the processor attached to each image.

Under vLLM's tensor parallelism the routed adapters are sharded like the linears they sit
beside (`sharding.py`): `gate_up_proj` and the projector's `linear_1` split their output,
`down_proj` and `linear_2` their input, summing partial results with vLLM's all-reduce.

What it does not do: import `vllm.model_executor.models.llava`, support pipeline
parallelism for the adapters, CUDA graphs or torch.compile (run with `enforce_eager=True`),
or more than one image per request.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsLoRA,
    SupportsMultiModal,
)
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_layer_index,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from smolora.server.engine.config import HF_CONFIG_KEY, KERNEL_CONFIG_KEY, MM_KEY, AdapterLayout
from smolora.server.engine.kernel_build import DEFAULT_KERNEL
from smolora.server.engine.kernel_config import KernelConfig
from smolora.server.engine.overlap_helper import OverlapHelper, start_overlap_helper
from smolora.server.engine.processor import (
    SMoLoRALlavaDummyInputsBuilder,
    SMoLoRALlavaMultiModalProcessor,
    SMoLoRALlavaProcessingInfo,
)
from smolora.server.engine.routed_linear import RoutedAdapter
from smolora.server.engine.row_state import RowRoutingState, StepRouting, StepScope
from smolora.server.engine.sharding import NO_SHARD, Shard, Split

logger = logging.getLogger(__name__)


def tensor_parallel_shard(split: Split) -> Shard:
    """This process's `Shard` of a linear split `split` ways under vLLM's tensor parallelism
    (`NO_SHARD` at TP=1)."""
    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return NO_SHARD
    return Shard(
        get_tensor_model_parallel_rank(), size, split, all_reduce=tensor_model_parallel_all_reduce
    )


class RoutedLlamaMLP(nn.Module):
    """vLLM's Llama MLP (gate_up -> SiLU*up -> down) with SMoLoRA deltas on its linears.

    Args:
        mlp: the `LlamaMLP` whose modules it takes over (weights load into them as usual).
        layer_index: decoder layer number, for canonical names (`layers.{i}.mlp.gate_proj`).
        layout, state, scope: adapter layout, row state, and the scope holding the step.
        targets: adapted suffixes (e.g. "mlp.gate_proj").
        dtype: model dtype.
    """

    def __init__(
        self,
        mlp: nn.Module,
        layer_index: int,
        layout: AdapterLayout,
        state: RowRoutingState,
        scope: StepScope,
        targets: tuple[str, ...],
        dtype: torch.dtype,
        overlap: OverlapHelper | None = None,
        kernel: KernelConfig = DEFAULT_KERNEL,
    ) -> None:
        super().__init__()
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.scope = scope
        hidden = self.gate_up_proj.input_size
        inter = self.down_proj.input_size
        prefix = f"layers.{layer_index}.mlp"
        gu = [
            (f"{prefix}.{n}", off)
            for n, off in (("gate_proj", 0), ("up_proj", inter))
            if f"mlp.{n}" in targets
        ]
        self.gate_up_adapter = (
            RoutedAdapter(
                layout,
                [n for n, _ in gu],
                [o for _, o in gu],
                hidden,
                inter,
                2 * inter,
                state,
                False,
                dtype,
                overlap,
                kernel,
                shard=tensor_parallel_shard("output"),
            )
            if gu
            else None
        )
        self.down_adapter = (
            RoutedAdapter(
                layout,
                [f"{prefix}.down_proj"],
                [0],
                inter,
                hidden,
                hidden,
                state,
                False,
                dtype,
                overlap,
                kernel,
                shard=tensor_parallel_shard("input"),
            )
            if "mlp.down_proj" in targets
            else None
        )

    def forward(self, x: Tensor) -> Tensor:  # x: [N, hidden]
        step = self.scope.current
        # Each delta starts before its base matmul, so the overlap helper (if any) computes it
        # meanwhile.
        gu = self.gate_up_adapter if step is not None else None
        pending = gu.begin_delta(x, step) if gu is not None else None
        h, _ = self.gate_up_proj(x)
        if gu is not None:
            h = gu.end_delta(pending, x, h.contiguous(), step)
        a = self.act_fn(h)
        down = self.down_adapter if step is not None else None
        pending = down.begin_delta(a, step) if down is not None else None
        out, _ = self.down_proj(a)
        if down is not None:
            out = down.end_delta(pending, a, out.contiguous(), step)
        return out


class RoutedProjector(nn.Module):
    """LLaVA's projector (linear_1 -> act -> linear_2) with optional routed adapters."""

    def __init__(
        self,
        vision_hidden: int,
        text_hidden: int,
        act: str,
        bias: bool,
        quant_config: object,
        prefix: str,
        layout: AdapterLayout | None,
        state: RowRoutingState | None,
        dtype: torch.dtype,
        kernel: KernelConfig = DEFAULT_KERNEL,
    ) -> None:
        super().__init__()
        self.linear_1 = ColumnParallelLinear(
            vision_hidden,
            text_hidden,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.linear_1",
        )
        self.act = get_act_fn(act)
        self.linear_2 = RowParallelLinear(
            text_hidden,
            text_hidden,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.linear_2",
        )
        self.adapter_1 = self.adapter_2 = None
        if layout is not None and state is not None:
            t = layout.target_modules
            if "multi_modal_projector.linear_1" in t:
                self.adapter_1 = RoutedAdapter(
                    layout,
                    ["projector.linear_1"],
                    [0],
                    vision_hidden,
                    text_hidden,
                    text_hidden,
                    state,
                    True,
                    dtype,
                    kernel=kernel,
                    shard=tensor_parallel_shard("output"),
                )
            if "multi_modal_projector.linear_2" in t:
                self.adapter_2 = RoutedAdapter(
                    layout,
                    ["projector.linear_2"],
                    [0],
                    text_hidden,
                    text_hidden,
                    text_hidden,
                    state,
                    True,
                    dtype,
                    kernel=kernel,
                    shard=tensor_parallel_shard("input"),
                )

    def forward(self, features: Tensor, step: StepRouting | None) -> Tensor:
        """`[num_patches_total, vision_hidden]` -> `[num_patches_total, text_hidden]`."""
        h, _ = self.linear_1(features)
        if step is not None and self.adapter_1 is not None:
            h = self.adapter_1.add_delta(features, h.contiguous(), step)
        a = self.act(h)
        out, _ = self.linear_2(a)
        if step is not None and self.adapter_2 is not None:
            out = self.adapter_2.add_delta(a, out.contiguous(), step)
        return out


@MULTIMODAL_REGISTRY.register_processor(
    SMoLoRALlavaMultiModalProcessor,
    info=SMoLoRALlavaProcessingInfo,
    dummy_inputs=SMoLoRALlavaDummyInputsBuilder,
)
class SMoLoRALlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsLoRA):
    """LLaVA (CLIP + projector + Llama) for vLLM, with SMoLoRA routed adapters.

    It also declares vLLM's LoRA interface (the language model's packed linears), so that with
    our adapters off the same class serves vLLM's own multi-LoRA: the peer the benchmarks
    compare the routed adapters with (`bench/vllm_lora.py`). The two are not combined: with
    routed adapters on, vLLM's LoRA must stay off (`EngineConfig` refuses both).
    """

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    hf_to_vllm_mapper = WeightsMapper(
        # transformers 5 saves the CLIP tower without its `vision_model.` level.
        orig_to_new_regex={
            re.compile(
                r"^(?:model\.)?vision_tower\.(?!vision_model\.)"
            ): "vision_tower.vision_model."
        },
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        },
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("only the image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        dtype = vllm_config.model_config.dtype
        raw = getattr(config, HF_CONFIG_KEY, None)
        self.layout = AdapterLayout.from_dict(dict(raw)) if raw else AdapterLayout(enabled=False)
        raw_kernel = getattr(config, KERNEL_CONFIG_KEY, None)
        self.kernel_config = (
            KernelConfig.from_dict(dict(raw_kernel)) if raw_kernel else DEFAULT_KERNEL
        )
        parallel = vllm_config.parallel_config
        if self.layout.enabled and parallel.pipeline_parallel_size != 1:
            raise ValueError("SMoLoRA adapters support pipeline_parallel_size=1 only")
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_index]
        )
        device = torch.get_default_device()
        self.smolora_state: RowRoutingState | None = (
            RowRoutingState(self.layout, vllm_config.scheduler_config.max_num_seqs, device)
            if self.layout.enabled
            else None
        )
        self.scope = StepScope()
        quant_config = vllm_config.quant_config
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionModel(
                config.vision_config,
                quant_config=quant_config,
                num_hidden_layers_override=get_layer_index(
                    config.vision_feature_layer, config.vision_config.num_hidden_layers
                ),
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.multi_modal_projector = RoutedProjector(
                config.vision_config.hidden_size,
                config.text_config.hidden_size,
                config.projector_hidden_act or "gelu",
                getattr(config, "multimodal_projector_bias", True),
                quant_config,
                maybe_prefix(prefix, "multi_modal_projector"),
                self.layout if self.layout.enabled else None,
                self.smolora_state,
                dtype,
                self.kernel_config,
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"],
            )
        #: Runs the MLP layers' routed deltas beside their base matmuls
        #: (`AdapterLayout.cpu_overlap`).
        #: Not under tensor parallelism: each rank's worker is bound to its own CPUs, and the
        #: CPUs outside one rank's binding run the other ranks.
        self.overlap_helper = (
            start_overlap_helper(self.layout.cpu_overlap, self.kernel_config)
            if self.smolora_state is not None
            and device.type == "cpu"
            and parallel.tensor_parallel_size == 1
            else None
        )
        if self.smolora_state is not None:
            for i, layer in enumerate(self.language_model.model.layers):
                if hasattr(layer, "mlp"):
                    layer.mlp = RoutedLlamaMLP(
                        layer.mlp,
                        i,
                        self.layout,
                        self.smolora_state,
                        self.scope,
                        self.layout.target_modules,
                        dtype,
                        self.overlap_helper,
                        self.kernel_config,
                    )
            self.smolora_state.finalize()
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def get_mm_mapping(self) -> MultiModelKeys:
        """Module prefixes of the language model, projector and tower (vLLM's LoRA manager)."""
        return MultiModelKeys.from_string_field(
            language_model="language_model",
            connector="multi_modal_projector",
            tower_model="vision_tower",
        )

    # -- adapters ------------------------------------------------------------------------------
    def routed_adapters(self) -> list[RoutedAdapter]:
        """Every adapter module, in column order (projector first, then decoder layers)."""
        return [m for m in self.modules() if isinstance(m, RoutedAdapter)]

    def _text_step(self, positions: Tensor) -> StepRouting | None:
        st = self.smolora_state
        if st is None or not st.any_active or not is_forward_context_available():
            return None
        meta = get_forward_context().attn_metadata
        if not meta:
            return None
        if isinstance(meta, list):  # micro-batches: never enabled for our engine
            meta = meta[0]
        first = next(iter(meta.values()))
        qsl = first.query_start_loc
        num_reqs = qsl.shape[0] - 1
        num_actual = int(getattr(first, "num_actual_tokens", positions.shape[0]))
        decode_only = getattr(first, "max_query_len", 0) == 1 and num_actual == positions.shape[0]
        return st.text_step(positions, qsl, num_reqs, num_actual, decode_only=decode_only)

    # -- vLLM model interface --------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        pixel_values = pixel_values.to(self.vision_tower.dtype)  # [n_img, 3, H, W]
        features = self.vision_tower(
            pixel_values, feature_select_strategy=self.config.vision_feature_select_strategy
        )
        n_img, patches, width = features.shape
        step = None
        st = self.smolora_state
        keys = kwargs.get(MM_KEY)
        if st is not None and st.any_active and keys is not None:
            key_list = [int(k) for k in torch.as_tensor(keys).flatten().tolist()]
            step = st.image_step(key_list, patches)
        out = self.multi_modal_projector(features.reshape(n_img * patches, width), step)
        return out.view(n_img, patches, -1)

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        step = self._text_step(positions)
        try:
            with self.scope.active(step):
                hidden = self.language_model.model(
                    input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
                )
        finally:
            if self.overlap_helper is not None:
                self.overlap_helper.drain()  # a layer that raised may have left a job behind
        if step is not None:
            self.smolora_state.finish_step(step)  # type: ignore[union-attr]
        return hidden

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
