"""Draw docs/images/before-after.png: a photo and the emulator's edit of it, side by side.

The "after" is what the emulator serves for this prompt (`emulator/images.py`, the same
code its jobs run), so the picture shows what `make demo` and the README's first edit
produce offline. Run from the repository root: `python docs/before_after.py`.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from prefect_nanobanana.emulator.images import output_size, read_input_image, render_output

PROMPT = "Add snow to the harbour"
OUT = Path(__file__).resolve().parent / "images" / "before-after.png"
PANEL_WIDTH = 360


def harbour(size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A small drawn harbour: sky, sun, hills, sea, a boat and a pier."""
    width, height = size
    picture = Image.new("RGB", size)
    draw = ImageDraw.Draw(picture)
    horizon = int(height * 0.6)
    for y in range(horizon):  # sky, lighter towards the horizon
        shade = y / horizon
        draw.line([(0, y), (width, y)], fill=(70 + int(120 * shade), 140 + int(80 * shade), 220))
    draw.ellipse((width * 0.72, height * 0.1, width * 0.84, height * 0.26), fill=(255, 214, 90))
    draw.polygon(
        [(0, horizon), (width * 0.25, height * 0.38), (width * 0.5, horizon)], fill=(70, 120, 80)
    )
    hills = [(width * 0.35, horizon), (width * 0.6, height * 0.42), (width, horizon)]
    draw.polygon(hills, fill=(50, 100, 70))
    for y in range(horizon, height):  # sea, darker towards the front
        shade = (y - horizon) / (height - horizon)
        draw.line([(0, y), (width, y)], fill=(20, 90 - int(40 * shade), 140 - int(50 * shade)))
    hull = [(width * 0.3, height * 0.7), (width * 0.55, height * 0.7), (width * 0.5, height * 0.78)]
    draw.polygon([*hull, (width * 0.34, height * 0.78)], fill=(150, 40, 40))
    mast = [(width * 0.42, height * 0.7), (width * 0.42, height * 0.48)]
    draw.line(mast, fill=(60, 40, 30), width=5)
    sail = [
        (width * 0.43, height * 0.5),
        (width * 0.52, height * 0.68),
        (width * 0.43, height * 0.68),
    ]
    draw.polygon(sail, fill=(245, 245, 235))
    draw.rectangle((width * 0.68, height * 0.74, width, height * 0.78), fill=(110, 80, 55))
    return picture


def panel(image: Image.Image, label: str) -> Image.Image:
    """The image scaled to the panel's width, with a label above it."""
    scaled = image.resize(
        (PANEL_WIDTH, round(image.height * PANEL_WIDTH / image.width)), Image.Resampling.LANCZOS
    )
    framed = Image.new("RGB", (PANEL_WIDTH, scaled.height + 28), (255, 255, 255))
    ImageDraw.Draw(framed).text((4, 4), label, fill=(30, 30, 30), font=ImageFont.load_default(18))
    framed.paste(scaled, (0, 28))
    return framed


def main() -> None:
    photo = harbour()
    encoded = io.BytesIO()
    photo.save(encoded, "PNG")
    source = read_input_image(encoded.getvalue(), keep_pixels=True)
    size = output_size("auto", "1K", source.size)
    edited = Image.open(io.BytesIO(render_output(PROMPT, 0, size, "png", source=source)))
    before, after = panel(photo, "before: photo.png"), panel(edited, f'after: "{PROMPT}"')
    gap = 12
    sheet = Image.new(
        "RGB", (2 * PANEL_WIDTH + gap, max(before.height, after.height)), (255, 255, 255)
    )
    sheet.paste(before, (0, 0))
    sheet.paste(after, (PANEL_WIDTH + gap, 0))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # A palette keeps the file small; the drawing has few colours.
    sheet.quantize(colors=128).save(OUT, optimize=True)
    print(f"{OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
