"""Screenshots and batches shared by the VLM tests."""

from PIL import Image, ImageDraw


def shot(i: int) -> Image.Image:
    """A 224x224 synthetic screenshot whose two boxes move a little with `i`."""
    im = Image.new("RGB", (224, 224), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([10 + 6 * i, 10, 120, 70], fill=(30, 60, 200))
    d.rectangle([20, 120 + 4 * i, 200, 150], outline="black")
    return im


def two_screenshot_batch(processor):
    chats = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": shot(0)},
                    {"type": "image", "image": shot(1)},
                    {"type": "text", "text": "Compute 45+38-27."},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": shot(2)},
                    {"type": "image", "image": shot(3)},
                    {"type": "text", "text": "Open settings please."},
                ],
            }
        ],
    ]
    processor.tokenizer.padding_side = "left"
    return processor.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True, padding=True
    )


def session_run(session, turns=3):
    texts, logits = [], []
    for t in range(turns):
        texts.append(session.step(shot(t), f"Click button {t}"))
        logits.append(session.last_logits)
    return texts, logits
