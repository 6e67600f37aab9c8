"""ComfyUI custom node pack: Re-Basin Align, Re-Basin Merge and Re-Basin Merge Many (category
advanced/model_merging/re-basin), from the sd-mecha-rebasin package, which must be installed into
the Python that runs ComfyUI (see comfyui/README.md). No other node pack is needed."""

try:
    from sd_mecha_rebasin.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # the package is not installed in ComfyUI's Python: say how, in one line
    raise ImportError(
        f"sd_mecha_rebasin_nodes needs the sd-mecha-rebasin package in ComfyUI's Python ({e}); "
        "install it with: python -m pip install -r custom_nodes/sd_mecha_rebasin_nodes/requirements.txt"
    ) from e

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
