//! The device, its limits, and buffers checked against them.

use crate::EdgeError;
use wgpu::util::DeviceExt;

pub(super) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// The limits the device was created with (every size is checked here
    /// first, so a model that does not fit fails with the limit's name).
    pub limits: wgpu::Limits,
    /// Adapter name and backend, for logs and the bench.
    pub adapter: String,
    /// The adapter runs on the CPU (lavapipe, WARP): a correctness
    /// vehicle, not a speed figure.
    pub software: bool,
}

impl Gpu {
    /// The highest-performance adapter, with `limits` (the adapter's own
    /// when `None`; tests pass lower ones).
    pub fn new(limits: Option<&wgpu::Limits>) -> Result<Self, EdgeError> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(
            instance.request_adapter(&wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() }),
        )
        .map_err(|e| {
            EdgeError::Gpu(format!(
                "no GPU adapter found ({e}); without a GPU, install Mesa's software Vulkan driver \
                 (Debian: apt-get install mesa-vulkan-drivers libvulkan1)"
            ))
        })?;
        let info = adapter.get_info();
        let limits = limits.cloned().unwrap_or_else(|| adapter.limits());
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tandem-draft"),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| EdgeError::Gpu(format!("requesting a device from `{}`: {e}", info.name)))?;
        let adapter = format!("{} ({:?})", info.name, info.backend);
        let software = info.device_type == wgpu::DeviceType::Cpu;
        tracing::info!(%adapter, software, "wgpu device ready");
        Ok(Gpu { device, queue, limits, adapter, software })
    }

    /// Fails when a storage buffer of `bytes` for `what` passes the binding
    /// or buffer size limits.
    pub fn check_storage(&self, what: &str, bytes: u64) -> Result<(), EdgeError> {
        check(what, "max_storage_buffer_binding_size", bytes, self.limits.max_storage_buffer_binding_size)?;
        check(what, "max_buffer_size", bytes, self.limits.max_buffer_size)
    }

    /// Largest storage buffer this device binds.
    pub fn max_storage_bytes(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// Lays `groups` workgroups out as `[x, y]` with both within
    /// `max_compute_workgroups_per_dimension` (kernels read the linear id
    /// back with `flat_group`).
    pub fn grid(&self, what: &str, groups: u32) -> Result<[u32; 2], EdgeError> {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        let x = groups.clamp(1, max);
        let y = groups.div_ceil(x);
        check(what, "max_compute_workgroups_per_dimension", y as u64, max as u64)?;
        Ok([x, y])
    }

    /// A storage buffer holding `bytes` (a multiple of 4 long; at least one
    /// word, since empty bindings are invalid).
    pub fn storage_init(&self, what: &str, bytes: &[u8]) -> Result<wgpu::Buffer, EdgeError> {
        let bytes = if bytes.is_empty() { &[0; 4][..] } else { bytes };
        self.check_storage(what, bytes.len() as u64)?;
        Ok(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(what), contents: bytes, usage: wgpu::BufferUsages::STORAGE }))
    }

    /// A zeroed storage buffer of `words` 4-byte words that can be copied from.
    pub fn storage(&self, what: &str, words: usize) -> Result<wgpu::Buffer, EdgeError> {
        let bytes = 4 * words.max(1) as u64;
        self.check_storage(what, bytes)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    /// A uniform buffer of `words`, padded to 16 bytes (WGSL's uniform
    /// struct alignment); `COPY_DST` so per-step values can be rewritten.
    pub fn uniform(&self, what: &str, words: &[u32]) -> wgpu::Buffer {
        let mut padded = words.to_vec();
        padded.resize(words.len().next_multiple_of(4).max(4), 0);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(what),
            contents: &words_bytes(&padded),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }
}

fn check(what: &str, limit: &'static str, needed: u64, allowed: u64) -> Result<(), EdgeError> {
    if needed > allowed {
        return Err(EdgeError::GpuLimit { what: what.to_string(), limit, needed, allowed });
    }
    Ok(())
}

fn words_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

pub(super) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
