"""How a message names an option: the way the user gave it.

The same setting reaches the library three ways: a CLI flag (`clock-deploy export --sampling gather`),
a config key (`model.sampling: gather` in a YAML file or a `KEY=VALUE` override) or an API argument
(`Exporter(..., sampling="gather")`). A message that tells the user what to change names the setting
the way they set it: the caller says which (`via`), this module spells it.
"""
CLI, CONFIG, API = "cli", "config", "api"
VIAS = (CLI, CONFIG, API)

# API argument -> CLI flag where the flag is not "--" + the argument with dashes; a dict maps values to flags
CLI_FLAGS = {"exclude_nodes": "--exclude-node", "precision": {"fp16": "--fp16", "int8": "--int8"},
             "out_dir": "--out", "trt": "--trt", "img_size": "--imgsz", "dynamic_batch": "--dynamic/--static"}
# API argument -> config key
CONFIG_KEYS = {"sampling": "model.sampling", "exclude_nodes": "export.exclude_nodes", "calib": "export.calib",
               "calib_images": "export.calib_images", "precision": "export.precision", "device": "bench.device",
               "workspace_gb": "export.workspace_gb", "dla_core": "export.dla_core", "topk": "export.topk",
               "opset": "export.opset", "img_size": "data.img_size", "dynamic_batch": "export.dynamic_batch"}


def option(key, value=None, via=API):
    """`key` (an API argument name) set to `value` as the user writes it: '--sampling gather' (CLI),
    'model.sampling=gather' (config), "sampling='gather'" (API); value None: the name alone."""
    if via not in VIAS:
        raise ValueError(f"via must be one of {VIAS}, got {via!r}")
    if via == CLI:
        flag = CLI_FLAGS.get(key, "--" + key.replace("_", "-"))
        if isinstance(flag, dict):
            return flag.get(value, f"--{key.replace('_', '-')} {value}")
        if isinstance(value, (list, tuple)):  # a repeatable flag
            return " ".join(f"{flag} {v}" for v in value)
        return flag if value is None or value is True else f"{flag} {value}"
    if via == CONFIG:
        name = CONFIG_KEYS.get(key, key)
        return name if value is None else f"{name}={value}"
    return key if value is None else f"{key}={value!r}"
