"""A checkpoint of the paper's reference code, imported with `import-reference` and served by
the real vLLM engine, equals the reference's own forward token for token.

The reference side is written here from the layer's published math (shared SMOLORA.md, "The
reference's checkpoint format"), independently of `adapters/smolora/`: every expert is
computed and masked by the one-hot routes; the VU route is the argmax of `lora_vu_gate` on
the mean over dim 1 of the layer input (at a cached decode step, the new token alone); the IF
route is the argmax of `lora_ins_gate(ins_emb[ins_type])`; the two results are fused by the
softmax of `lora_fc_A` / `lora_fc_B` scores. It reads the reference-layout tensors directly,
wraps the HF LLaVA's linears, and generates with HF `generate`, one request at a time (as
the reference serves: its mean includes padding, so only batch size 1 is defined). The engine
gets all requests of a mixed batch (images and text only, different instructions) at once,
on the shared session engine, with no routing mode named: the imported version's manifest
makes it per-step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from smolora.adapters.tiny_llava import load_llava
from smolora.server.engine.config import EngineConfig, EngineConfigError
from smolora.server.engine.engine import collect, collect_all
from smolora.server.engine.protocol import GenerateChunk, GenerateRequest
from smolora.server.engine.versions import resolve_vu_routing
from smolora.training.cli import main as training_cli
from tests.adapters.reference_layout import ReferenceLayout, write_reference_checkpoint
from tests.server.engine.engine_testlib import LoopThread, random_images

QUESTIONS = [
    "What is in the picture?",
    "How many shapes are there?",
    "What color is the object?",
    "Describe the image.",
    "Is there a cat?",
    "Where is the ball?",
]
INSTRUCTIONS = [
    {"task": "sqa", "text": "Answer with the option's letter from the given choices directly."},
    {"task": "textvqa", "text": "Answer the question using a single word or phrase."},
    {"task": "caption", "text": "Describe the image briefly in one sentence."},
    {"task": "imagenet", "text": "What is the object in the image?"},
    {"task": "gqa", "text": "Answer with one word."},
]


class ReferenceSMoLoraLinear(nn.Module):
    """The reference layer's forward (all experts computed, masked by one-hot routes).

    Args:
        base: the frozen linear it wraps.
        layout: the reference checkpoint (tensors under the reference's own key names).
        module: the reference module path (`model.layers.0.mlp.gate_proj`).
    """

    def __init__(self, base: nn.Linear, layout: ReferenceLayout, module: str) -> None:
        super().__init__()
        cfg = layout.config
        self.base = base
        self.num_experts = cfg["expert_num"]
        self.scaling = cfg["lora_alpha"] / cfg["r"]
        self.A = [
            layout.expert(module, "A", e).float() for e in range(self.num_experts)
        ]  # [r/E, d_in]
        self.B = [
            layout.expert(module, "B", e).float() for e in range(self.num_experts)
        ]  # [d_out, r/E]
        self.vu_gate = layout.single(module, "lora_vu_gate").float()  # [E/2, d_in]
        self.ins_gate = layout.single(module, "lora_ins_gate").float()  # [E/2, 384]
        self.fc_A = layout.single(module, "lora_fc_A").float()  # [1, d_out]
        self.fc_B = layout.single(module, "lora_fc_B").float()
        self.ins_emb = layout.ins_emb  # [K, 384]
        self.ins_type = 0
        self.vu_calls: list[int] = []  # the VU expert of every call (batch size 1)
        self.if_calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, d_in]
        half = self.num_experts // 2
        result = self.base(x)
        x_emb = torch.mean(x, dim=1, keepdim=True)  # [B, 1, d_in]
        vu_top1 = F.one_hot((x_emb @ self.vu_gate.t()).argmax(-1), half).to(x.dtype)  # [B, 1, E/2]
        ins = self.ins_emb[self.ins_type].expand(x.shape[0], -1)  # [B, 384]
        if_top1 = F.one_hot((ins @ self.ins_gate.t()).argmax(-1), half).to(x.dtype)[:, None, :]
        router = torch.cat([vu_top1, if_top1], dim=-1)  # [B, 1, E]
        vu_result: Tensor | float = 0.0
        if_result: Tensor | float = 0.0
        for e in range(self.num_experts):
            h = (x @ self.A[e].t()) @ self.B[e].t() * self.scaling * router[:, :, e : e + 1]
            if e < half:
                vu_result = vu_result + h
            else:
                if_result = if_result + h
        assert isinstance(vu_result, Tensor) and isinstance(if_result, Tensor)
        weights = F.softmax(
            torch.cat([vu_result @ self.fc_A.t(), if_result @ self.fc_B.t()], dim=-1), dim=-1
        )
        self.vu_calls.append(int(vu_top1[0, 0].argmax()))
        self.if_calls.append(int(if_top1[0, 0].argmax()) + half)
        return result + weights[..., :1] * vu_result + weights[..., 1:] * if_result


def _hf_module(model: nn.Module, reference_module: str) -> str:
    """The HF LLaVA module a reference module path (original LLaVA naming) adapts."""
    if reference_module.startswith("model.mm_projector."):
        suffix = {"0": "multi_modal_projector.linear_1", "2": "multi_modal_projector.linear_2"}[
            reference_module[-1]
        ]
    else:
        suffix = "language_model." + reference_module.removeprefix("model.")
    hits = [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    assert len(hits) == 1, (reference_module, hits)
    return hits[0]


def reference_model(
    model_dir: Path, layout: ReferenceLayout
) -> tuple[nn.Module, Any, dict[str, ReferenceSMoLoraLinear]]:
    """HF LLaVA with every reference-adapted linear wrapped; canonical name -> wrapper."""
    model, processor = load_llava(model_dir)
    wrappers: dict[str, ReferenceSMoLoraLinear] = {}
    for module in layout.modules:
        name = _hf_module(model, module)
        parent, _, child = name.rpartition(".")
        wrapper = ReferenceSMoLoraLinear(model.get_submodule(name), layout, module)
        setattr(model.get_submodule(parent), child, wrapper)
        canon = {
            "model.mm_projector.0": "projector.linear_1",
            "model.mm_projector.2": "projector.linear_2",
        }.get(module, module.removeprefix("model."))
        wrappers[canon] = wrapper
    return model, processor, wrappers


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory, registry: Path, tiny_model_dir: Path
) -> tuple[ReferenceLayout, Path]:
    """A reference checkpoint (E=4, r=16, alpha=48: scaling 3) published into the session
    registry with the user's command."""
    root = tmp_path_factory.mktemp("reference")
    layout = write_reference_checkpoint(
        root / "smolora-ckpt", ins_rows=len(INSTRUCTIONS), ins_type=4, seed=21
    )
    instructions = root / "instructions.json"
    instructions.write_text(json.dumps(INSTRUCTIONS))
    before = {p.name for p in registry.iterdir()}
    code = training_cli(
        [
            "import-reference",
            str(layout.path),
            "--base",
            str(tiny_model_dir),
            "--registry",
            str(registry),
            "--instructions",
            str(instructions),
            "--no-instruction-check",
        ]
    )
    assert code == 0
    (new,) = [p for p in registry.iterdir() if p.name not in before and p.name.startswith("v")]
    return layout, new


def _workload(layout: ReferenceLayout) -> list[tuple[str, Any, int, int]]:
    """(prompt, image or None, ins_emb row, max_tokens): 6 image requests (one image twice,
    with other instructions) and 2 text-only ones."""
    images: list[Any] = random_images(6, 32, seed=77)
    images[3] = images[0]
    out = []
    for i in range(8):
        row = i % len(INSTRUCTIONS)
        text = f"{QUESTIONS[i % len(QUESTIONS)]} {INSTRUCTIONS[row]['text']}"
        image = images[i] if i < 6 else None
        prompt = (
            f"USER: <image>\n{text} ASSISTANT:" if image is not None else f"USER: {text} ASSISTANT:"
        )
        out.append((prompt, image, row, 6 + (3 * i) % 7))
    return out


@pytest.mark.engine
def test_engine_serves_an_imported_reference_checkpoint_like_the_reference(
    loop: LoopThread, engine: Any, imported: tuple[ReferenceLayout, Path], tiny_model_dir: Path
) -> None:
    layout, path = imported
    info = loop.run(engine.load_version(path, activate=False))
    try:
        work = _workload(layout)
        requests = [
            GenerateRequest(
                prompt=p,
                image=im,
                instruction=layout.ins_emb[row],
                max_tokens=m,
                version=info.version,
            )
            for p, im, row, m in work
        ]
        results: list[GenerateChunk] = loop.run(
            collect_all(engine, requests)
        )  # all at once, one batch

        model, processor, layers = reference_model(tiny_model_dir, layout)
        base_model, _ = load_llava(tiny_model_dir)
        eos = processor.tokenizer.eos_token_id
        differs_from_base = 0
        for i, ((prompt, image, row, max_tokens), got) in enumerate(zip(work, results)):
            for layer in layers.values():
                layer.ins_type, layer.vu_calls, layer.if_calls = row, [], []
            inputs = (
                processor(text=prompt, images=image, return_tensors="pt")
                if image is not None
                else processor(text=prompt, return_tensors="pt")
            )
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )
                plain = base_model.generate(
                    **inputs,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )
            want = out[0, inputs["input_ids"].shape[1] :].tolist()
            differs_from_base += want != plain[0, inputs["input_ids"].shape[1] :].tolist()
            assert got.token_ids == want, (
                f"request {i}: engine tokens differ from the reference forward"
            )
            assert got.version == info.version
            trace = got.trace
            assert trace is not None and trace.exact and trace.vu_routing == "per_step"
            for route in trace.layers:
                ref = layers[route.layer]
                if route.layer.startswith("projector."):
                    if image is None:
                        continue
                    assert (route.vu_expert, route.if_expert) == (
                        ref.vu_calls[0],
                        ref.if_calls[0],
                    ), f"request {i}: {route.layer}"
                    continue
                assert (route.vu_expert, route.if_expert) == (ref.vu_calls[0], ref.if_calls[0]), (
                    f"request {i}: {route.layer}"
                )
                assert route.vu_steps == ref.vu_calls[1 : len(want)], (
                    f"request {i}: per-step VU routes of {route.layer}"
                )
        assert differs_from_base >= 4, (
            "the adapters barely change the outputs: the test would not show much"
        )
        traces = [r.trace for r in results if r.trace is not None]
        assert len({tuple(layer.vu_expert for layer in t.layers) for t in traces}) > 1, (
            "every request took the same VU routes"
        )
        assert len({tuple(layer.if_expert for layer in t.layers) for t in traces}) > 1, (
            "every request took the same IF routes"
        )
        assert any(len(set(layer.vu_steps or ())) > 1 for t in traces for layer in t.layers), (
            "no VU route changed while decoding"
        )

        # A request's own choice overrides the version's per-step default.
        pinned = loop.run(
            collect(
                engine,
                GenerateRequest(
                    prompt=work[0][0],
                    image=work[0][1],
                    instruction=layout.ins_emb[0],
                    max_tokens=4,
                    version=info.version,
                    vu_routing="pinned",
                ),
            )
        )
        assert pinned.trace is not None and pinned.trace.vu_routing == "pinned"
        # The active version (trained here) keeps its pinned default on the same engine.
        active = loop.run(
            collect(
                engine,
                GenerateRequest(
                    prompt=work[0][0], image=work[0][1], instruction=layout.ins_emb[0], max_tokens=2
                ),
            )
        )
        assert (
            active.version != info.version
            and active.trace is not None
            and active.trace.vu_routing == "pinned"
        )
    finally:
        loop.run(engine.unload_version(info.version))


def test_vu_routing_precedence(tiny_model_dir: Path) -> None:
    """A request's choice, then the server's (`EngineConfig.vu_routing`), then the version's."""
    assert resolve_vu_routing(None, None, "per_step") == "per_step"
    assert resolve_vu_routing(None, "pinned", "per_step") == "pinned"
    assert resolve_vu_routing("per_step", "pinned", "pinned") == "per_step"
    assert resolve_vu_routing("pinned", None, "per_step") == "pinned"
    assert EngineConfig(model_dir=tiny_model_dir, adapters=False).vu_routing is None
    with pytest.raises(EngineConfigError, match="vu_routing"):
        EngineConfig(model_dir=tiny_model_dir, adapters=False, vu_routing="sometimes")  # type: ignore[arg-type]
