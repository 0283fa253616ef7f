//! The only place that names concrete backends: `--device` picks one of those compiled in.

use burn::prelude::Backend;
use clap::ValueEnum;
use kv_core::readback::ReadBack;
use kv_core::{KvError, Result};

/// Which kernels a job takes (`--kernels`); see [`kv_attention::Kernels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum KernelChoice {
    /// Host kernels on CPU backends (flex, ndarray), the backend's own ops on GPUs.
    #[default]
    Auto,
    /// The vectorised host kernels wherever a call suits them (useful on CPU backends only).
    Host,
    /// The backend's own ops only (for comparison, or to rule the host kernels out).
    Backend,
}

static KERNEL_CHOICE: std::sync::OnceLock<KernelChoice> = std::sync::OnceLock::new();

/// Sets the `--kernels` choice for every job this process runs (once; later calls are ignored).
pub fn choose_kernels(choice: KernelChoice) {
    let _ = KERNEL_CHOICE.set(choice);
}

/// The kernels a job on `kind` takes under the `--kernels` choice.
pub fn kernels_for(kind: DeviceKind) -> kv_attention::Kernels {
    match KERNEL_CHOICE.get().copied().unwrap_or_default() {
        KernelChoice::Auto => kv_attention::Kernels::for_backend(kind.is_cpu()),
        KernelChoice::Host => kv_attention::Kernels::host(),
        KernelChoice::Backend => kv_attention::Kernels::backend_ops(),
    }
}

/// A compute backend selectable with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// burn-flex: pure-Rust CPU backend (SIMD, rayon); the default.
    Flex,
    /// burn-ndarray: the older CPU backend.
    Ndarray,
    /// wgpu: Vulkan/Metal/DX12 GPUs (Mesa lavapipe on a CPU-only machine).
    Wgpu,
    /// CUDA: NVIDIA GPUs (driver and NVRTC loaded at run time).
    Cuda,
}

impl DeviceKind {
    /// The lower-case name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Flex => "flex",
            DeviceKind::Ndarray => "ndarray",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// The first backend compiled into this build, preferring the CPU default.
    pub fn default_compiled() -> Self {
        [
            DeviceKind::Flex,
            DeviceKind::Ndarray,
            DeviceKind::Cuda,
            DeviceKind::Wgpu,
        ]
        .into_iter()
        .find(|d| d.is_compiled())
        .unwrap_or(DeviceKind::Flex)
    }

    /// Whether the backend keeps its tensors in host memory (so the global allocator sees them).
    pub fn is_cpu(self) -> bool {
        matches!(self, DeviceKind::Flex | DeviceKind::Ndarray)
    }

    /// Whether this build includes the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            DeviceKind::Flex => cfg!(feature = "flex"),
            DeviceKind::Ndarray => cfg!(feature = "ndarray"),
            DeviceKind::Wgpu => cfg!(feature = "wgpu"),
            DeviceKind::Cuda => cfg!(feature = "cuda"),
        }
    }
}

/// Work that is generic over the backend; [`run_on`] instantiates it for the chosen device.
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Runs the job on backend `B`.
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// The backend whose policy registry names policies outside a job (help, report tables); the
/// registry's names and kinds do not depend on the backend.
#[cfg(feature = "flex")]
pub type NamingBackend = burn::backend::Flex;
/// The backend whose policy registry names policies outside a job.
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
pub type NamingBackend = burn::backend::NdArray;
/// The backend whose policy registry names policies outside a job.
#[cfg(all(not(any(feature = "flex", feature = "ndarray")), feature = "wgpu"))]
pub type NamingBackend = burn::backend::Wgpu;
/// The backend whose policy registry names policies outside a job.
#[cfg(all(
    not(any(feature = "flex", feature = "ndarray", feature = "wgpu")),
    feature = "cuda"
))]
pub type NamingBackend = burn::backend::Cuda;
#[cfg(not(any(
    feature = "flex",
    feature = "ndarray",
    feature = "wgpu",
    feature = "cuda"
)))]
compile_error!("kv needs at least one backend feature: flex, ndarray, wgpu or cuda");

/// The policies `kv` knows: the standard registry (a binary of one's own registers more here).
pub fn policies<B: Backend>() -> kv_policies::Registry<B> {
    kv_policies::Registry::standard()
}

/// Runs `job` on the backend `kind`, or explains which cargo feature would compile it in.
pub fn run_on<J: BackendJob>(kind: DeviceKind, job: J) -> Result<J::Output> {
    // CubeCL backends have a native top-k; burn's CPU backends only sort.
    let native_top_k = matches!(kind, DeviceKind::Wgpu | DeviceKind::Cuda);
    kv_policies::select::set_top_k_method(if native_top_k {
        kv_policies::select::TopKMethod::ArgTopK
    } else {
        kv_policies::select::TopKMethod::Sort
    });
    // A CPU backend's tensors are in host memory already, and the host kernels are vectorised
    // and spread a prefill over every core (burn-flex's fused attention runs on one thread).
    kernels_for(kind).set_default();
    match kind {
        #[cfg(feature = "flex")]
        DeviceKind::Flex => job.run::<burn::backend::Flex>(Default::default()),
        #[cfg(feature = "ndarray")]
        DeviceKind::Ndarray => job.run::<burn::backend::NdArray>(Default::default()),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => {
            let device = Default::default();
            probe_device::<burn::backend::Wgpu>(&device, kind)?;
            job.run::<burn::backend::Wgpu>(device)
        }
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            let device = Default::default();
            probe_device::<burn::backend::Cuda>(&device, kind)?;
            job.run::<burn::backend::Cuda>(device)
        }
        #[allow(unreachable_patterns)]
        other => {
            let _ = job;
            Err(KvError::config(
                "--device",
                other.name(),
                format!(
                    "a backend compiled into this build; rebuild with `cargo build --release -p kv-cli --features {}`",
                    other.name()
                ),
            ))
        }
    }
}

/// Touches a GPU backend's device once, so a machine without its driver (no libcuda, no Vulkan
/// adapter) gets one error line naming the device instead of a panic inside the first kernel
/// launch; the panic's own report is silenced and its message kept.
#[allow(dead_code)]
fn probe_device<B: burn::prelude::Backend>(device: &B::Device, kind: DeviceKind) -> Result<()> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let touched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        burn::prelude::Tensor::<B, 1>::zeros([1], device).read_back()
    }));
    std::panic::set_hook(hook);
    touched.map(|_| ()).map_err(|panic| {
        let why = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("its runtime panicked");
        let why: String = why.split_whitespace().collect::<Vec<_>>().join(" ");
        let needs = match kind {
            DeviceKind::Cuda => "an NVIDIA GPU with its driver (libcuda)",
            _ => "a GPU adapter wgpu can open (Vulkan, Metal or DX12; on Linux without a GPU, Mesa's lavapipe: scripts/install-lavapipe.sh)",
        };
        KvError::config("--device", kind.name(), format!("a device this machine has: {} needs {needs}, and it did not start ({why}); `--device flex` runs on any CPU", kind.name()))
    })
}
