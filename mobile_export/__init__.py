"""Core ML bundles of the server's model for the phone: conversion, manifest, verification (docs/mobile.md)."""
