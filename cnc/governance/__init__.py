"""Generated from proto/ by `python -m cncbrain.protogen`; do not edit."""
