"""Stage 1 network of VAEmo: the unified audio-visual masked autoencoder (see ``av.py``)."""

from vaemo.model.av import (
                            AVMAE,
                            AVConfig,
                            config_for,
                            info_nce,
                            load,
                            masked_mse,
                            model_info,
                            patchify_audio,
                            patchify_video,
                            random_mask,
                            save,
                            tube_mask,
                            unpatchify_audio,
                            unpatchify_video,
)

__all__ = ["AVConfig", "AVMAE", "config_for", "info_nce", "load", "masked_mse", "model_info", "patchify_audio",
           "patchify_video", "random_mask", "save", "tube_mask", "unpatchify_audio", "unpatchify_video"]
