"""Training data: the synthetic shapes generator (`shapes`) and image-caption folder loading (`dataset`)."""
