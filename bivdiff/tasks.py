"""What differs between the tasks (one per image model, IDM): the image model's own weights beside Stable Diffusion
1.5's, the condition or mask each reads, its pipeline class, and how that pipeline is called. The models are found
in `models_resolution`, loaded and run in the runner.
"""

import importlib
from dataclasses import dataclass

from PIL import Image

from bivdiff import conditions
from bivdiff.config import RunConfig


@dataclass
class Inputs:
    """What the pipeline call reads besides the config: source frames, and a condition or mask video."""

    source: list[Image.Image]
    condition: list[Image.Image] | None = None
    condition_name: str | None = None  # the condition actually computed (names its file)
    condition_label: str | None = None  # its label in the comparison video
    mask: list[Image.Image] | None = None


class Task:
    """One image model's task; subclasses say what differs."""

    idm: str
    title: str
    pipeline_class_name: str
    # The catalogue key of the image model's own weights (formatted with the IDM options), beside SD-1.5's.
    own_model: str | None = None

    def pipeline_class(self):
        """Imported on use, so listing and checking configs never pays for importing diffusers."""
        return getattr(importlib.import_module("bivdiff"), self.pipeline_class_name)

    def inputs(self, config: RunConfig, source: list[Image.Image], read) -> Inputs:
        """The condition or mask, read (and so checked, with the environment) before any model loads;
        `read(dotted_key, as_mask)` reads the video a config key names with the run's frame selection."""
        return Inputs(source=source)

    def annotator(self, config: RunConfig) -> str | None:
        """The condition whose annotator weights the run needs, if any."""
        return None

    def annotate(self, config: RunConfig, inputs: Inputs, models: dict) -> Inputs:
        """Conditions that need model weights (annotators), computed once the models are resolved."""
        return inputs

    def call_arguments(self, config: RunConfig, inputs: Inputs) -> dict:
        """The task's own keyword arguments of the pipeline call (the shared ones are added by the runner)."""
        prompt = config.model["idm_prompt"] + config.idm_options["prompt_suffix"]
        return dict(video=inputs.source, prompt=prompt, cross_frame_attention=config.model["cross_frame_attention"])


class ControllableTask(Task):
    """ControlNet or T2I-Adapter on a condition video (canny, depth, pose)."""

    pipeline_class_name = "BIVDiffControllablePipeline"

    def __init__(self, idm: str, title: str, component: str, own_model: str):
        self.idm, self.title, self.component, self.own_model = idm, title, component, own_model

    def channels(self, config: RunConfig) -> int:
        return conditions.condition_channels(self.idm, config.idm_options["condition"])

    def annotator(self, config: RunConfig) -> str | None:
        options = config.idm_options
        needed = not config.tiny and options["condition_video"] is None and conditions.needs_annotator(
            options["condition"]
        )
        return options["condition"] if needed else None

    def inputs(self, config, source, read) -> Inputs:
        options, condition = config.idm_options, config.idm_options["condition"]
        if options["condition_video"] is not None:
            mode = "L" if self.channels(config) == 1 else "RGB"
            frames = [f.convert(mode) for f in read(f"IDM.{self.idm}.condition_video", False)]
            return Inputs(source, frames, condition, f"{condition} (given)")
        if self.annotator(config):
            conditions.check_annotators_installed(condition, f"IDM.{self.idm}.condition")
            return Inputs(source, None, condition, condition)
        # Annotator weights are real downloads, so a tiny run stands canny edges in for depth and pose.
        low, high = options["canny_low_threshold"], options["canny_high_threshold"]
        label = "canny" if condition == "canny" else f"canny (tiny stand-in for {condition})"
        return Inputs(source, conditions.canny_frames(source, low, high, self.channels(config)), "canny", label)

    def annotate(self, config, inputs, models) -> Inputs:
        if inputs.condition is None:
            location = models["annotators"].location
            inputs.condition = conditions.annotate_frames(
                inputs.source, inputs.condition_name, location, self.channels(config)
            )
        return inputs

    def call_arguments(self, config, inputs) -> dict:
        options = config.idm_options
        arguments = dict(super().call_arguments(config, inputs), conditioning_frames=inputs.condition,
                         num_frames=config.model["video_length"])
        del arguments["video"]
        arguments[f"{self.component}_conditioning_scale"] = options["conditioning_scale"]
        # ControlNet's guidance window, guess mode and smoothing; T2I-Adapter's config has no such keys.
        controlnet_only = ("control_guidance_start", "control_guidance_end", "guess_mode", "control_smoothing")
        return dict(arguments, **{key: options[key] for key in controlnet_only if key in options})


class InstructPix2PixTask(Task):
    idm = "InstructPix2Pix"
    title = "video editing by instruction (InstructPix2Pix)"
    pipeline_class_name = "BIVDiffInstructPix2PixPipeline"
    own_model = "instruct-pix2pix"

    def call_arguments(self, config, inputs) -> dict:
        image_scale = config.idm_options["image_guidance_scale"]
        return dict(super().call_arguments(config, inputs), image_guidance_scale=image_scale)


class Prompt2PromptTask(Task):
    idm = "Prompt2Prompt"
    title = "video editing from a source prompt to an edited prompt (Prompt2Prompt)"
    pipeline_class_name = "BIVDiffPrompt2PromptPipeline"

    def call_arguments(self, config, inputs) -> dict:
        options = config.idm_options
        source_prompt, edited_prompt = (p + options["prompt_suffix"] for p in options["prompts"])
        same = ("cross_replace_steps", "self_replace_steps", "upcast_editing", "local_blend_threshold")
        return dict(
            video=inputs.source,
            source_prompt=source_prompt,
            prompt=edited_prompt,
            edit_type=options["controller_type"].removeprefix("Attention").lower(),
            reweight=dict(zip(options["reweight_words"], options["reweight_strengths"])) or None,
            edit_with_ddim=options["scheduler"] == "DDIM",
            local_blend_words=options["local_blend_words"] or None,
            **{key: options[key] for key in same},
        )


class InpaintTask(Task):
    """Stable Diffusion Inpainting with a mask video (inpainting) or band masks (outpainting)."""

    pipeline_class_name = "BIVDiffInpaintPipeline"
    own_model = "sd-inpainting"

    def __init__(self, idm: str, title: str):
        self.idm, self.title = idm, title

    def inputs(self, config, source, read) -> Inputs:
        if self.idm == "StableDiffusionOutpainting":
            model, mask_type = config.model, config.idm_options["mask_type"]
            mask = conditions.outpainting_masks(len(source), model["height"], model["width"], mask_type)
            return Inputs(source=source, mask=mask, condition_label=f"mask ({mask_type})")
        mask = conditions.binarise_masks(read(f"IDM.{self.idm}.video_mask_path", True))
        return Inputs(source=source, mask=mask, condition_label="mask")

    def call_arguments(self, config, inputs) -> dict:
        outpaint = config.idm_options.get("mask_type")
        return dict(super().call_arguments(config, inputs), paste_back=config.idm_options["paste_back"],
                    **({"outpaint": outpaint} if outpaint else {"mask": inputs.mask}))


TASKS: dict[str, Task] = {
    "ControlNet": ControllableTask("ControlNet", "controllable video generation (ControlNet)", "controlnet",
                                   "controlnet-{condition}"),
    "T2IAdapter": ControllableTask("T2IAdapter", "controllable video generation (T2I-Adapter)", "adapter",
                                   "t2iadapter-{condition}"),
    "InstructPix2Pix": InstructPix2PixTask(),
    "Prompt2Prompt": Prompt2PromptTask(),
    "StableDiffusionInpainting": InpaintTask("StableDiffusionInpainting", "video inpainting (SD Inpainting)"),
    "StableDiffusionOutpainting": InpaintTask("StableDiffusionOutpainting", "video outpainting (SD Inpainting)"),
}


def task_for(config: RunConfig) -> Task:
    return TASKS[config.idm]
