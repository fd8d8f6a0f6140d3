"""pyeccv.models"""
