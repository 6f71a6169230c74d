"""Wrapping user texts in a chat template, for routing with vs without one (study 5).

The template comes from, in this order: an explicit template string with a ``{text}``
placeholder; the tokenizer's own chat template (``tokenizer.apply_chat_template`` with one
user message and the generation prompt); otherwise :data:`DEFAULT_TEMPLATE`, a minimal
"User: ... Assistant:" frame. The user text must appear verbatim in the result, so the
compare analysis can align its tokens by character offsets within it.
"""
from __future__ import annotations

from typing import Any

from moescope.errors import MoescopeError

DEFAULT_TEMPLATE = "User: {text}\nAssistant:"


def template_source(tokenizer: Any, template: str | None) -> str:
    """Which template :func:`render_chat` uses: "custom", "tokenizer" or "default"."""
    if template is not None:
        return "custom"
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else "default"


def render_chat(text: str, tokenizer: Any = None, template: str | None = None) -> str:
    """`text` as the single user turn of a chat, ending where the assistant's reply begins."""
    source = template_source(tokenizer, template)
    if source == "tokenizer":
        try:
            out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        except Exception as exc:  # templates are user-supplied Jinja: any failure is the template's
            raise MoescopeError(f"the tokenizer's chat template failed ({exc}); pass --template 'User: {{text}}'") from exc
    else:
        frame = template if template is not None else DEFAULT_TEMPLATE
        if "{text}" not in frame:
            raise MoescopeError(f"--template {frame!r} has no {{text}} placeholder for the user text")
        out = frame.replace("{text}", text)
    if text not in out:
        raise MoescopeError("the chat template changes the user text (it must appear verbatim); "
                            "pass a --template with a {text} placeholder")
    return out


def unescape_template(template: str | None) -> str | None:
    r"""Turn the two-character sequences \n and \t typed on a command line into real ones."""
    if template is None:
        return None
    return template.replace("\\n", "\n").replace("\\t", "\t")
