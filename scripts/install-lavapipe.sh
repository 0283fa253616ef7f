#!/usr/bin/env bash
# Makes sure a Vulkan device exists for the WGPU tests: on a machine without a GPU, Mesa's lavapipe
# (a Vulkan 1.3 implementation on the CPU; slow, but it runs the same shaders a GPU does).
# Idempotent: does nothing when a Vulkan device is already present. Exits 1 with one line when it
# can neither find nor install one.
set -uo pipefail

icds() {
  for f in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json; do
    [ -e "$f" ] && printf '%s ' "$(basename "$f")"
  done
}

has_device() {
  # The Vulkan loader is what wgpu opens; the ICD files say which drivers it can load.
  [ -n "$(icds)" ] && [ -n "$(ldconfig -p 2>/dev/null | grep 'libvulkan.so.1')" ]
}

if has_device; then
  echo "install-lavapipe: a Vulkan driver is present ($(icds))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-lavapipe: no Vulkan device and no apt-get; install Mesa's Vulkan drivers (lavapipe) by hand" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install-lavapipe: no Vulkan device, and installing mesa-vulkan-drivers needs root" >&2
    exit 1
  fi
fi
echo "install-lavapipe: installing mesa-vulkan-drivers (lavapipe) with apt-get"
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null; }; then
  echo "install-lavapipe: apt-get could not install mesa-vulkan-drivers" >&2
  exit 1
fi
has_device || { echo "install-lavapipe: mesa-vulkan-drivers installed, but no Vulkan driver is visible" >&2; exit 1; }
echo "install-lavapipe: lavapipe installed"
