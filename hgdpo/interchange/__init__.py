"""Public preference data in and out (Pick-a-Pic v2, HPDv2)."""
