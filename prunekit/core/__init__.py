"""Core machinery: plans, surgery, save/load."""
