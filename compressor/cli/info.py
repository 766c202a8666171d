from __future__ import annotations

from rich.table import Table

from compressor.cli.common import AllowPickleOpt, JsonOpt, ModelArg, emit_json, out


def info(model: ModelArg = "smollm2-135m", json: JsonOpt = False, allow_pickle: AllowPickleOpt = False) -> None:
    """Show architecture, depth, width, parameters, dtype and size of a model."""
    from compressor.info import model_info
    from compressor.loading import load_model, resolve

    source = resolve(model)
    loaded, _ = load_model(source, dtype="auto", allow_pickle=allow_pickle, with_tokenizer=False)
    data = model_info(loaded, source)
    if json:
        emit_json(data)
        return
    table = Table(title=f"{model}", show_header=False)
    for key, value in data.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    out.print(table)
