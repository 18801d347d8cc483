"""Anomaly detectors: CLIPFusion (the method), WinCLIP / WinCLIP+ and a mean-image colour baseline.

Each implements :class:`clipfusion.protocol.Detector`.  The baselines import nothing from
``methods/clipfusion/``; what several methods share (memory banks, WinCLIP windows) lives beside them.
"""
