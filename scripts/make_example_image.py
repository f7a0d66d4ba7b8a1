"""Draw examples/input.png: a small synthetic scene (sky, sun, hills, house) to edit in the quick start."""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "examples" / "input.png"


def main(out: Path = OUT) -> None:
    w, h = 640, 480
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):  # sky gradient
        t = y / h
        draw.line([(0, y), (w, y)], fill=(int(90 + 100 * t), int(150 + 60 * t), 235))
    draw.ellipse([470, 50, 560, 140], fill=(255, 214, 90))
    draw.polygon([(0, 330), (180, 250), (360, 320), (520, 240), (640, 300), (640, 480), (0, 480)], fill=(70, 140, 70))
    draw.rectangle([230, 300, 370, 400], fill=(190, 90, 60))
    draw.polygon([(220, 300), (300, 240), (380, 300)], fill=(120, 50, 40))
    draw.rectangle([285, 345, 315, 400], fill=(80, 50, 30))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG", optimize=True)


if __name__ == "__main__":
    main()
