"""The two branches of CLIPFusion, each turning encoder outputs into anomaly maps on its own grid."""
