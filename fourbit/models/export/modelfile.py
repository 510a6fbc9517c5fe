"""An Ollama Modelfile for an exported GGUF: ``FROM ./model.gguf``, the chat template in Ollama's Go template
language when it is of a family fourbit recognizes, its default system prompt, and ``PARAMETER stop`` lines.

The family is recognized by what the model's own Jinja chat template renders for a fixed conversation, not by
its text, so a template written differently but producing ChatML (SmolLM2, Qwen2) is ChatML. A template of
another family gets no ``TEMPLATE`` line: Ollama then uses the template stored in the GGUF's metadata.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "chat_family", "modelfile_for"]

_PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]

FAMILIES = {
    "chatml": {
        "render": ("<|im_start|>system\nS1<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
                   "A1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"),
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "template": ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                     "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                     "<|im_start|>assistant\n"),
        "stop": ("<|im_start|>", "<|im_end|>"),
    },
    "llama3": {
        "render": ("<|start_header_id|>system<|end_header_id|>\n\nS1<|eot_id|><|start_header_id|>user"
                   "<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant"
                   "<|end_header_id|>\n\n"),
        "system": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        "template": ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
                     "{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                     "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "stop": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    },
}


def _render(tokenizer, messages: list[dict[str, str]]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may raise anything (jinja errors, its own raise_exception)
        return None


def chat_family(tokenizer) -> tuple[str | None, str | None]:
    """(family name or None, the default system prompt the template inserts or None)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None, None
    rendered = _render(tokenizer, _PROBE)
    bos = getattr(tokenizer, "bos_token", None) or ""
    for family, spec in FAMILIES.items():
        if rendered is not None and rendered in (spec["render"], bos + spec["render"]):
            lead = rendered[:len(rendered) - len(spec["render"])]  # a BOS the template writes itself, or ""
            bare = (_render(tokenizer, [{"role": "user", "content": "U1"}]) or "").removeprefix(lead)
            start, end = spec["system"]
            system = bare[len(start):bare.index(end, len(start))] if bare.startswith(start) else None
            return family, system
    return None, None


def _quoted(text: str) -> str:
    return f'"""{text}"""'


def modelfile_for(gguf_name: str, tokenizer) -> tuple[str, list[str]]:
    """(Modelfile text for ``./<gguf_name>``, notes for the user)."""
    family, system = chat_family(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    notes: list[str] = []
    stops: list[str] = []
    if family is not None:
        spec = FAMILIES[family]
        lines.append(f"TEMPLATE {_quoted(spec['template'])}")
        if system and '"""' not in system:
            lines.append(f"SYSTEM {_quoted(system)}")
        stops += spec["stop"]
    elif tokenizer is not None and getattr(tokenizer, "chat_template", None):
        lines.append("# the chat template is not ChatML or Llama-3: Ollama uses the one stored in the GGUF file")
        notes.append("Modelfile: the chat template is of no family fourbit translates; Ollama will use the "
                     "template stored in the GGUF")
    else:
        notes.append("Modelfile: the tokenizer has no chat template; the model gets raw prompts in Ollama")
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops if '"' not in s]
    return "\n".join(lines) + "\n", notes
