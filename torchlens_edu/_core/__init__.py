"""The bottom layer: helpers every family uses (console, frames, module matching, nested
outputs, JSON with comments). Imports torch and rich only."""
