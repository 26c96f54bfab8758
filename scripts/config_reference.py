"""Print the config reference table (Markdown) from the pydantic schema in config.py."""

from __future__ import annotations

from pydantic import BaseModel

from trainwell.app.config import RunConfig

BOUNDS = ("gt", "ge", "lt", "le", "min_length")


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, f"{prefix}{name}.")
            continue
        default = field.default if field.default_factory is None else field.default_factory()
        kind = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
        bounds = [
            f"{k} {getattr(m, k)}"
            for m in field.metadata
            for k in BOUNDS
            if getattr(m, k, None) is not None
        ]
        notes = (field.description or "") + (f" ({', '.join(bounds)})" if bounds else "")
        out.append(f"| `{prefix}{name}` | `{kind}` | `{default!r}` | {notes.strip()} |")
    return out


def table() -> str:
    return "\n".join(
        ["| key | type | default | notes |", "| --- | --- | --- | --- |", *rows(RunConfig)]
    )


if __name__ == "__main__":
    print(table())
