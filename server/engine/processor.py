"""The multimodal processor of our vLLM LLaVA model.

What it does: tells vLLM how many placeholder tokens one `<image>` becomes (CLIP patches,
CLS dropped, as LLaVA's "default" strategy), runs the model folder's HF `LlavaProcessor`
for pixel values, builds dummy inputs for memory profiling, and carries one extra per-image
field, `smolora_key`: the engine puts a request's key in `mm_processor_kwargs`, so the
projector (which runs in `embed_multimodal`, outside the text forward) knows which request
-- and therefore which instruction and checkpoint slot -- an image belongs to. Because vLLM
hashes `mm_processor_kwargs` into each item's cache identity, two requests never share a
projector output (which depends on their instruction).

What it does not do: template chat messages or decode images (the caller passes PIL images),
or support more than CLIP vision towers and one image per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature, LlavaConfig
from transformers.models.llava import LlavaProcessor
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.clip import CLIPEncoderInfo
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from smolora.server.engine.config import MM_KEY

#: Key value of an image that belongs to no SMoLoRA request (served by the base model).
NO_KEY = -1


def _strip_ours(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k != MM_KEY}


class SMoLoRALlavaProcessingInfo(BaseProcessingInfo):
    """Sizes and the HF processor of a LLaVA model folder with a CLIP tower."""

    def get_hf_config(self) -> LlavaConfig:
        return self.ctx.get_hf_config(LlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        processor = self.ctx.get_hf_processor(LlavaProcessor, **_strip_ours(kwargs))
        if processor.patch_size is None:
            processor.patch_size = self.get_hf_config().vision_config.patch_size
        return processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}

    def _encoder_info(self) -> CLIPEncoderInfo:
        return CLIPEncoderInfo(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """Placeholder tokens per image: CLIP patches (+CLS) minus CLS for "default"."""
        n = self._encoder_info().get_num_image_tokens(
            image_width=image_width, image_height=image_height
        )
        strategy = self.get_hf_config().vision_feature_select_strategy
        if strategy == "default":
            return n - 1
        if strategy == "full":
            return n
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")

    def get_image_size_with_most_features(self) -> ImageSize:
        side = self._encoder_info().get_image_size()
        return ImageSize(width=side, height=side)

    def get_max_image_tokens(self) -> int:
        size = self.get_image_size_with_most_features()
        return self.get_num_image_tokens(image_width=size.width, image_height=size.height)


class SMoLoRALlavaDummyInputsBuilder(BaseDummyInputsBuilder[SMoLoRALlavaProcessingInfo]):
    """White images at the model's input size, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        return {
            "image": self._get_dummy_images(
                width=size.width,
                height=size.height,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class SMoLoRALlavaMultiModalProcessor(BaseMultiModalProcessor[SMoLoRALlavaProcessingInfo]):
    """HF LLaVA processing plus the per-image `smolora_key` field."""

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        key = int(hf_kwargs.get(MM_KEY, NO_KEY))  # type: ignore[call-overload]
        out = super()._call_hf_processor(hf_data, _strip_ours(hf_kwargs))
        if "pixel_values" in out:
            n = len(out["pixel_values"])
            out[MM_KEY] = torch.full((n,), key, dtype=torch.int64)
        return out

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            MM_KEY: MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", ImageProcessorItems)
            size = images.get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            return [image_token_id] * n

        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)
        ]
