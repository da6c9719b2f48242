"""Evaluation: what every genfast method is judged by.

fid (FID/KID through clean-fid, named feature spaces), lpips_metric (LPIPS, local weights only),
faithfulness (PSNR/SSIM to the unaccelerated images), prompt_accuracy and classifier (genfast-mini),
cost (latency, denoiser calls, peak memory), variants + compare + report (`genfast compare`).
"""
