"""Synthetic GUI screenshots for benchmarks, tests and the demo: a desktop with a window, buttons, a
text field that fills in over turns, a highlighted button that moves and a mouse cursor, so that
consecutive screenshots differ a little, as an agent's do."""

from __future__ import annotations

from PIL import Image, ImageDraw


def screenshot(turn: int, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A desktop: a window with a title bar, a row of buttons, a text field whose content grows by a
    few characters per turn, a highlighted button that moves, and a mouse cursor."""
    w, h = size
    im = Image.new("RGB", size, (58, 110, 165))
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = w // 10, h // 8, 9 * w // 10, 7 * h // 8
    d.rectangle([x0, y0, x1, y1], fill=(240, 240, 240), outline=(30, 30, 30))
    d.rectangle([x0, y0, x1, y0 + h // 12], fill=(45, 45, 80))
    d.text((x0 + 8, y0 + 4), f"Settings - window {seed}", fill="white")
    labels = ["Save", "Open", "Close", "Help", "Print"]
    bw = (x1 - x0) // (len(labels) + 1)
    for i, label in enumerate(labels):
        bx = x0 + 10 + i * (bw + 6)
        fill = (250, 200, 60) if i == turn % len(labels) else (200, 200, 210)
        d.rectangle([bx, y0 + h // 6, bx + bw, y0 + h // 6 + h // 12], fill=fill, outline="black")
        d.text((bx + 6, y0 + h // 6 + 4), label, fill="black")
    fy = y0 + h // 3
    d.rectangle([x0 + 10, fy, x1 - 10, fy + h // 12], fill="white", outline="black")
    d.text((x0 + 16, fy + 4), "user@example.com"[: 3 + 2 * turn], fill="black")
    cx, cy = x0 + 20 + (turn * 37) % (x1 - x0 - 40), y0 + h // 2 + (turn * 23) % (h // 4)
    d.polygon([(cx, cy), (cx + 10, cy + 24), (cx + 16, cy + 14)], fill="black")
    return im


def instruction(turn: int) -> str:
    return ["Type the email address.", "Click Save.", "Open the file menu.", "Close the dialog.", "Press Help."][
        turn % 5
    ]
