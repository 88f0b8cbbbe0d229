"""What one app request may ask for, in one place (the UI states these)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (stated in the UI)."""

    adapters: int = 10
    prompts: int = 12
    prompt_chars: int = 400
    new_tokens: int = 128  # generated per prompt and variant
    image_side: int = 1024  # pixels, width and height of generated images
    steps: int = 50  # denoising steps per image


LIMITS = Limits()
