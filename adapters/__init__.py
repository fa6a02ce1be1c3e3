"""smolora.adapters: the pure-torch SMoLoRA library (no vLLM, no HTTP).

Subpackages: `smolora/` (the SMoLoRA layer, routers, routing context, model wrapper),
`baselines/` (LoRA, MoELoRA), `tiny_llava/` (the embedded model). Modules:
`checkpoint` (format, publish, verify), `instructions` (MiniLM encoder, instruction
table), `injection` (target matching), `reference_generate` (the semantics oracle).
"""
