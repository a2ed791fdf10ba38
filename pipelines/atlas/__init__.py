"""The whole-head atlas composed once from installed templates (pydeface's head, nilearn's
MNI152 brain and tissue maps): what defacing, QC and volumetry place on a subject, and what the
synthetic cohort is drawn from."""
