"""ComfyUI's own nodes for re-basin (Re-Basin Align, Re-Basin Merge, Re-Basin Merge Many), working on
its MODEL and CLIP objects. Loaded by the custom-node folder `comfyui/custom_nodes/sd_mecha_rebasin_nodes`
inside ComfyUI; ComfyUI's modules are imported only when a node runs."""
