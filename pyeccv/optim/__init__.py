"""pyeccv.optim"""
