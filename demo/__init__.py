"""The Gradio demo of gpg-vl, installed as the package `gpg_vl_demo`."""
