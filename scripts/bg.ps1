# Start/stop a background process for the .bat scripts (Windows). Used by start_*.bat / stop_*.bat.
# pid: completo\run\<Name>.pid   log: completo\logs\<Name>.out.log / <Name>.err.log
param(
  [Parameter(Mandatory = $true)][ValidateSet('start', 'stop')][string]$Action,
  [Parameter(Mandatory = $true)][string]$Name,
  [Parameter(Mandatory = $true)][string]$Script,
  [Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest = @()
)
$ErrorActionPreference = 'Stop'
$Root = Split-Path -Parent $PSScriptRoot
$RunDir = if ($env:MONITOR_RUN_DIR) { $env:MONITOR_RUN_DIR } else { Join-Path $Root 'completo\run' }
$LogDir = if ($env:MONITOR_LOG_DIR) { $env:MONITOR_LOG_DIR } else { Join-Path $Root 'completo\logs' }
New-Item -ItemType Directory -Force -Path $RunDir, $LogDir | Out-Null
$PidFile = Join-Path $RunDir "$Name.pid"
$StopFile = Join-Path $RunDir "$Name.stop"

function Get-Running {
  if (-not (Test-Path $PidFile)) { return $null }
  $id = (Get-Content $PidFile -ErrorAction SilentlyContinue | Select-Object -First 1)
  if (-not $id) { return $null }
  return Get-Process -Id ([int]$id) -ErrorAction SilentlyContinue
}

if ($Action -eq 'start') {
  $running = Get-Running
  if ($running) { Write-Host "$Name ja esta rodando (pid $($running.Id)). Use scripts\stop_$Name.bat."; exit 1 }
  Remove-Item -Force -ErrorAction SilentlyContinue $StopFile
  $python = Join-Path $Root '.venv\Scripts\python.exe'
  if (-not (Test-Path $python)) { $python = if ($env:PYTHON) { $env:PYTHON } else { 'python' } }
  $argList = @("`"$(Join-Path $Root $Script)`"", '--stop-file', "`"$StopFile`"") + $Rest
  $p = Start-Process -FilePath $python -ArgumentList $argList -WorkingDirectory $Root -WindowStyle Hidden -PassThru `
        -RedirectStandardOutput (Join-Path $LogDir "$Name.out.log") -RedirectStandardError (Join-Path $LogDir "$Name.err.log")
  Set-Content -Path $PidFile -Value $p.Id -Encoding ascii
  Start-Sleep -Seconds 2
  if ($p.HasExited) {
    Remove-Item -Force $PidFile
    Write-Host "$Name terminou logo ao iniciar. Veja $(Join-Path $LogDir "$Name.err.log")"
    exit 1
  }
  Write-Host "$Name iniciado (pid $($p.Id)). Logs em $LogDir"
  exit 0
}

# stop: ask for a graceful exit through the stop file, then wait
$running = Get-Running
if (-not $running) { Remove-Item -Force -ErrorAction SilentlyContinue $PidFile; Write-Host "$Name nao esta rodando."; exit 0 }
Write-Host "Parando $Name (pid $($running.Id)): termina o trabalho em andamento antes de sair..."
Set-Content -Path $StopFile -Value 'stop' -Encoding ascii
$limit = if ($env:STOP_TIMEOUT) { [int]$env:STOP_TIMEOUT } else { 120 }
if (-not $running.WaitForExit($limit * 1000)) {
  Write-Host "$Name nao terminou em $limit s. Para forcar: taskkill /F /PID $($running.Id)"
  exit 1
}
Remove-Item -Force -ErrorAction SilentlyContinue $PidFile, $StopFile
Write-Host "$Name parado."
exit 0
