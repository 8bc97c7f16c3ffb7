"""The `routescope dash` app: figure builders (`figures`), run sources (`sources`) and the Dash app (`app`)."""
