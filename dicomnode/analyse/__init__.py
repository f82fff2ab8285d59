"""Analysis stage: segment tumours, measure radiomics features, predict (all PURE modules)."""
